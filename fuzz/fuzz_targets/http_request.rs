//! The gateway's HTTP request reader on arbitrary client bytes: `parse_head`, the body framing
//! that `conn.rs`'s `parse_one` does with it (Content-Length, `ChunkedDecoder`), pipelined
//! requests, and `percent_decode_segment` on the path.
//!
//! Input: byte 0 picks the limits, byte 1 how the bytes are split into reads, the rest is what
//! the client sent. Besides "no panic", it checks the reader's promises: limits hold for every
//! accepted head, a head parses the same whatever the read boundaries, and the chunked decoder
//! gives the same result fed at once or in pieces.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moltbot::gateway::http::{self, BodyFraming, ChunkedDecoder, HttpError, Limits, RequestHead};

/// Defaults, tight limits (every limit path reachable by small inputs), and more header slots
/// than fit on the stack (the heap path of `parse_head`).
fn limits(sel: u8) -> Limits {
    match sel % 4 {
        0 => Limits::default(),
        1 => Limits {
            max_header_bytes: 256,
            max_headers: 4,
            max_body_bytes: 64,
            max_uri_bytes: 32,
        },
        2 => Limits {
            max_header_bytes: 48,
            max_headers: 1,
            max_body_bytes: 0,
            max_uri_bytes: 4,
        },
        _ => Limits {
            max_header_bytes: 1 << 16,
            max_headers: 200,
            max_body_bytes: 1 << 20,
            max_uri_bytes: 1 << 16,
        },
    }
}

/// What every error of the reader promises: a status from the documented set, a connection
/// that closes (its end is unknown), and a well-formed error response.
fn check_error(e: &HttpError) {
    assert!(matches!(e.status(), 400 | 413 | 414 | 431 | 505), "{e:?}");
    assert!(
        e.closes_connection(),
        "reader error keeps the connection: {e:?}"
    );
    let mut out = Vec::new();
    e.write_response(&mut out);
    assert!(out.starts_with(b"HTTP/1.1 "));
    assert!(out.windows(4).any(|w| w == b"\r\n\r\n"));
}

fn check_head(head: &RequestHead, buf: &[u8], limits: &Limits, split: u8) {
    assert!(head.head_len > 0 && head.head_len <= buf.len());
    assert!(head.head_len <= limits.max_header_bytes);
    assert!(head.target.len() <= limits.max_uri_bytes);
    assert!(head.target.starts_with('/') && !head.target.contains('#'));
    if let BodyFraming::Length(n) = head.body {
        assert!(n <= limits.max_body_bytes as u64);
    }
    if head.expect_continue {
        assert!(!matches!(
            head.body,
            BodyFraming::None | BodyFraming::Length(0)
        ));
    }
    // The head is self-contained: the same answer from exactly its bytes, and "read more"
    // from any shorter prefix (a client's read boundaries never change the outcome).
    let again = http::parse_head(&buf[..head.head_len], limits);
    assert_eq!(again.as_ref(), Ok(&Some(head.clone())));
    let cut = usize::from(split) * head.head_len / 256;
    let prefix = http::parse_head(&buf[..cut], limits);
    assert_eq!(prefix, Ok(None), "prefix of {cut} bytes of a complete head");

    let (path, _query) = http::split_target(&head.target);
    assert_eq!(path, head.path());
    for seg in path.split('/') {
        if let Ok(s) = http::percent_decode_segment(seg) {
            check_segment(seg, &s);
        }
    }
}

/// What `percent_decode_segment` promises of an accepted segment: no control character, no
/// raw `/`, and a `/` in the result only for each encoded `%2F`.
fn check_segment(raw: &str, decoded: &str) {
    assert!(!raw.contains('/'));
    assert!(!decoded.chars().any(|c| c.is_ascii_control()));
    let encoded_slashes = raw.to_ascii_lowercase().matches("%2f").count();
    assert_eq!(decoded.matches('/').count(), encoded_slashes, "{raw:?}");
}

/// Decodes `rest` in one call; returns (result, body, consumed).
fn decode_whole(rest: &[u8], limits: &Limits) -> (Result<bool, HttpError>, Vec<u8>, usize) {
    let mut dec = ChunkedDecoder::new();
    let mut body = Vec::new();
    match dec.decode(rest, &mut body, limits) {
        Ok(p) => {
            assert!(p.consumed <= rest.len());
            assert_eq!(p.done, dec.is_done());
            if !p.done {
                assert_eq!(p.consumed, rest.len(), "stopped early without being done");
            }
            assert_eq!(dec.decoded_len(), body.len() as u64);
            (Ok(p.done), body, p.consumed)
        }
        Err(e) => {
            check_error(&e);
            // A failed decoder stays failed.
            assert!(dec.decode(b"0\r\n\r\n", &mut Vec::new(), limits).is_err());
            (Err(e), body, 0)
        }
    }
}

/// Decodes `rest` fed in pieces of varying sizes (as reads would deliver it).
fn decode_pieces(
    rest: &[u8],
    limits: &Limits,
    split: u8,
) -> (Result<bool, HttpError>, Vec<u8>, usize) {
    let mut dec = ChunkedDecoder::new();
    let mut body = Vec::new();
    let mut at = 0;
    let mut step = usize::from(split % 13) + 1;
    while at < rest.len() {
        let end = (at + step).min(rest.len());
        // Every other piece goes through the sink API, as the ring-slot path uses it.
        let r = if step % 2 == 0 {
            dec.decode(&rest[at..end], &mut body, limits)
        } else {
            dec.decode_with(&rest[at..end], limits, |d| body.extend_from_slice(d))
        };
        match r {
            Ok(p) => {
                assert!(p.consumed <= end - at);
                at += p.consumed;
                if p.done {
                    return (Ok(true), body, at);
                }
                assert_eq!(at, end, "stopped early without being done");
            }
            Err(e) => return (Err(e), body, 0),
        }
        step = step * 7 % 29 + 1;
    }
    (Ok(false), body, at)
}

fuzz_target!(|data: &[u8]| {
    let [sel, split, buf @ ..] = data else {
        return;
    };
    let limits = limits(*sel);
    if let Ok(s) = std::str::from_utf8(buf)
        && let Ok(d) = http::percent_decode_segment(s)
    {
        check_segment(s, &d);
    }
    // Pipelined requests, framed the way `parse_one` frames them.
    let mut start = 0;
    while start < buf.len() {
        let data = &buf[start..];
        let head = match http::parse_head(data, &limits) {
            Ok(Some(head)) => head,
            Ok(None) => {
                // The caller caps its head buffer at max_header_bytes.
                assert!(data.len() < limits.max_header_bytes);
                return;
            }
            Err(e) => {
                check_error(&e);
                return;
            }
        };
        check_head(&head, data, &limits, *split);
        let rest = &data[head.head_len..];
        let consumed = match head.body {
            BodyFraming::None => head.head_len,
            BodyFraming::Length(n) => match usize::try_from(n) {
                Ok(n) if n <= rest.len() => head.head_len + n,
                _ => return,
            },
            BodyFraming::Chunked => {
                let whole = decode_whole(rest, &limits);
                let pieces = decode_pieces(rest, &limits, *split);
                assert_eq!(whole.0.is_ok(), pieces.0.is_ok(), "{whole:?} vs {pieces:?}");
                if let (Ok(done), Ok(done2)) = (&whole.0, &pieces.0) {
                    assert_eq!(done, done2);
                    assert_eq!(whole.1, pieces.1, "decoded bodies differ");
                    assert_eq!(whole.2, pieces.2, "consumed differs");
                }
                let (Ok(true), body, used) = whole else {
                    return;
                };
                assert!(body.len() <= limits.max_body_bytes);
                head.head_len + used
            }
        };
        assert!(consumed > 0 && consumed <= data.len());
        start += consumed;
    }
});
