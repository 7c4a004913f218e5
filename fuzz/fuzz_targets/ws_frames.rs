//! The WebSocket protocol's frame reader on arbitrary client text: `parse_request` and
//! `check_connect` (what every frame before and after `hello-ok` goes through), and the frame
//! builders with arbitrary ids, names and messages.
//!
//! Besides "no panic", it checks their promises: an accepted request has a non-empty id and
//! method within their limits, and its params are the exact JSON text sent; a refused one
//! carries an id only if it is usable; a refused connect has a message and a known close code;
//! every frame the gateway builds parses back as JSON with the id, name and message it was
//! given.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moltbot::gateway::ws::frames::{
    self, ErrorShape, check_connect, close, error_frame, event_frame, ok_frame, parse_request,
};
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    let text = text.as_ref();

    // 1. The text as a whole frame.
    match parse_request(text) {
        Ok(r) => {
            assert!(!r.id.is_empty() && r.id.len() <= 256, "id {:?}", r.id);
            assert!(!r.method.is_empty() && r.method.len() <= 128);
            if let Some(p) = r.params {
                let v: Result<Value, _> = serde_json::from_str(p.get());
                assert!(v.is_ok(), "params are JSON: {:?}", p.get());
                assert!(text.contains(p.get()), "params untouched");
            }
            // As a connect: refused or accepted, never a panic.
            let nonce = "fuzz-nonce";
            match check_connect(r.params, nonce) {
                Ok((p, protocol)) => {
                    assert!(protocol == frames::PROTOCOL || protocol == frames::PROTOCOL_LEGACY);
                    assert!(p.min_protocol <= protocol && protocol <= p.max_protocol);
                    if let Some(d) = &p.device {
                        assert_eq!(d.nonce.0, nonce);
                    }
                }
                Err(e) => {
                    assert!(!e.message.is_empty());
                    assert!(e.close == close::POLICY || e.close == close::PROTOCOL);
                }
            }
            // The answer to it echoes its id exactly.
            let v: Value = serde_json::from_str(&ok_frame(&r.id, "null")).expect("ok frame");
            assert_eq!(v["id"].as_str(), Some(r.id.as_ref()));
        }
        Err(e) => {
            assert!(!e.message.is_empty());
            if let Some(id) = &e.id {
                assert!(!id.is_empty() && id.len() <= 256);
            }
        }
    }

    // 2. The text as connect params directly (any JSON value; `check_connect` gets only
    //    valid JSON from the request parser).
    if let Ok(raw) = serde_json::from_str::<Box<serde_json::value::RawValue>>(text) {
        let _ = check_connect(Some(&raw), text);
    }

    // 3. The builders with arbitrary strings: valid JSON that gives them back.
    let (a, b) = text.split_at(text.char_indices().nth(usize::from(sel) % 16).map_or(text.len(), |(i, _)| i));
    let mut e = ErrorShape::new(a, b, Some(b));
    if sel & 0x10 != 0 {
        e.retryable = Some(sel & 0x20 != 0);
        e.retry_after_ms = Some(u64::from(sel));
    }
    let v: Value = serde_json::from_str(&error_frame(a, &e)).expect("error frame");
    assert_eq!(v["id"].as_str(), Some(a));
    assert_eq!(v["ok"], false);
    if !a.is_empty() {
        assert_eq!(v["error"]["code"].as_str(), Some(a));
    }
    if !b.is_empty() {
        assert_eq!(v["error"]["message"].as_str(), Some(b));
    }
    assert_eq!(v["error"]["details"]["code"].as_str(), Some(b));
    let v: Value = serde_json::from_str(&event_frame(b, "{}", u64::from(sel))).expect("event");
    assert_eq!(v["event"].as_str(), Some(b));
    assert_eq!(v["seq"].as_u64(), Some(u64::from(sel)));
    // A worker's error body, whatever its bytes, becomes an error frame that is JSON.
    let w = frames::worker_error(a, 500, rest);
    let v: Value = serde_json::from_str(&error_frame(b, &w)).expect("worker error frame");
    assert_eq!(v["id"].as_str(), Some(b));
});
