//! The CLI's HTTP client for a running gateway (`moltbot workers status|route|demo`): `ureq`
//! over plain `http://HOST[:PORT][/BASE]`, with the failures a user meets (nothing listening,
//! no answer, an `https://` URL) turned into messages that name the URL.
//!
//! No TLS: the gateway speaks plain HTTP; remote gateways sit behind a TLS-terminating proxy
//! or a tunnel. Status codes are answers, not errors (the callers explain a 401 or a 503), and
//! redirects are not followed: the gateway never sends one, so one means a wrong URL.

use std::io::ErrorKind;
use std::net::ToSocketAddrs;
use std::time::Duration;

use ureq::http::{self, Method, Uri};

/// Largest accepted response body.
pub const MAX_RESPONSE_BODY: u64 = 64 * 1024 * 1024;

/// A complete response: status, headers and the whole body.
pub type Response = http::Response<Vec<u8>>;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URL is not `http://HOST[:PORT][/PATH]`.
    #[error("invalid gateway URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An `https://` URL: this client has no TLS.
    #[error(
        "cannot reach {url}: https is not supported; the gateway speaks plain HTTP \
         (use an http:// URL, through a TLS-terminating proxy or a tunnel for remote gateways)"
    )]
    Https {
        /// The URL as given.
        url: String,
    },
    /// Nothing listens at the address.
    #[error("no gateway at {url}: connection refused (is `moltbot gateway` running?)")]
    Refused {
        /// The URL.
        url: String,
    },
    /// The host name did not resolve.
    #[error("no gateway at {url}: cannot resolve {host:?}: {error}")]
    Resolve {
        /// The URL.
        url: String,
        /// The host part.
        host: String,
        /// Why (in the message, not a `source`: `{:#}` would print it twice).
        error: std::io::Error,
    },
    /// No complete answer within the timeout.
    #[error("no answer from {url} within {timeout:?}")]
    Timeout {
        /// The URL.
        url: String,
        /// The timeout of the whole request.
        timeout: Duration,
    },
    /// Connecting, sending or receiving failed for another reason.
    #[error("talking to {url}: {error}")]
    Io {
        /// The URL.
        url: String,
        /// Why (in the message, not a `source`: `{:#}` would print it twice).
        error: std::io::Error,
    },
    /// The request itself is not valid (method or header); never holds a header's value,
    /// which may be the token.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The server's answer is not valid HTTP/1.x.
    #[error("malformed HTTP response from {url}: {reason}")]
    BadResponse {
        /// The URL.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// The response body exceeds [`MAX_RESPONSE_BODY`].
    #[error("response from {url} is larger than {limit} bytes")]
    TooLarge {
        /// The URL.
        url: String,
        /// The limit.
        limit: u64,
    },
}

/// A gateway at one URL; its connections are kept alive between requests.
#[derive(Debug, Clone)]
pub struct Client {
    /// The URL as given, for messages.
    url: String,
    /// The URL without a trailing slash: request paths are appended to it.
    base: String,
    agent: ureq::Agent,
    timeout: Duration,
}

impl Client {
    /// A client for `url` (`http://HOST[:PORT][/BASE]`); every request, body included, must
    /// complete within `timeout`. Checks the URL without connecting.
    pub fn new(url: &str, timeout: Duration) -> Result<Client, ClientError> {
        let base = check_url(url)?;
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            // `*_PROXY` variables are for the internet; a gateway is on loopback or a tunnel.
            .proxy(None)
            .timeout_global(Some(timeout))
            .user_agent(concat!("moltbot-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .new_agent();
        Ok(Client {
            url: url.to_string(),
            base,
            agent,
            timeout,
        })
    }

    /// Sends `method` to the URL + `path` (which starts with `/` and is percent-encoded) with
    /// `headers` and `body`, and reads the whole answer.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Result<Response, ClientError> {
        let method = Method::from_bytes(method.as_bytes())
            .map_err(|_| ClientError::InvalidRequest(format!("method {method:?}")))?;
        if !path.starts_with('/') {
            return Err(ClientError::InvalidRequest(format!(
                "path {path:?} must start with '/'"
            )));
        }
        let uri: Uri = format!("{}{path}", self.base).parse().map_err(|e| {
            ClientError::InvalidRequest(format!("path {path:?} is not a valid URI path: {e}"))
        })?;
        let with_body = matches!(method, Method::POST | Method::PUT | Method::PATCH);
        let mut req = http::Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        // The error names the header, never its value (which may be the token).
        let invalid = |e: http::Error| ClientError::InvalidRequest(format!("header: {e}"));
        let sent = match body {
            Some(body) => self.agent.run(req.body(body).map_err(invalid)?),
            // A POST without a body still says `content-length: 0`, as servers expect of it.
            None if with_body => self.agent.run(req.body(&[][..]).map_err(invalid)?),
            None => self.agent.run(req.body(()).map_err(invalid)?),
        };
        let mut resp = sent.map_err(|e| self.failure(e))?;
        let body = resp
            .body_mut()
            .with_config()
            .limit(MAX_RESPONSE_BODY)
            .read_to_vec()
            .map_err(|e| self.failure(e))?;
        let (parts, _) = resp.into_parts();
        Ok(Response::from_parts(parts, body))
    }

    /// The host (IPv6 without brackets) and port the URL points at.
    fn host_port(&self) -> (String, u16) {
        let uri: Option<Uri> = self.base.parse().ok();
        let host = uri.as_ref().and_then(Uri::host).unwrap_or_default();
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = uri.as_ref().and_then(Uri::port_u16).unwrap_or(80);
        (host.to_string(), port)
    }

    /// `ureq`'s error as what went wrong for the user.
    fn failure(&self, e: ureq::Error) -> ClientError {
        let url = self.url.clone();
        match e {
            ureq::Error::Io(e) if e.kind() == ErrorKind::ConnectionRefused => {
                ClientError::Refused { url }
            }
            ureq::Error::Io(e)
                if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock) =>
            {
                ClientError::Timeout {
                    url,
                    timeout: self.timeout,
                }
            }
            ureq::Error::Timeout(_) => ClientError::Timeout {
                url,
                timeout: self.timeout,
            },
            ureq::Error::HostNotFound => ClientError::Resolve {
                host: self.host_port().0,
                url,
                error: std::io::Error::new(ErrorKind::NotFound, "no addresses"),
            },
            ureq::Error::Io(e) if e.kind() == ErrorKind::UnexpectedEof => {
                ClientError::BadResponse {
                    url,
                    reason: "the connection closed before a complete answer".to_string(),
                }
            }
            ureq::Error::Io(error) => {
                // A failed lookup is an I/O error of no particular kind: look again to tell
                // it from a failure on the connection.
                let (host, port) = self.host_port();
                match (host.as_str(), port).to_socket_addrs() {
                    Err(error) => ClientError::Resolve { url, host, error },
                    Ok(_) => ClientError::Io { url, error },
                }
            }
            ureq::Error::BodyExceedsLimit(_) => ClientError::TooLarge {
                url,
                limit: MAX_RESPONSE_BODY,
            },
            ureq::Error::Http(e) => ClientError::InvalidRequest(e.to_string()),
            ureq::Error::BadUri(reason) => ClientError::InvalidUrl { url, reason },
            ureq::Error::Protocol(e) => ClientError::BadResponse {
                url,
                reason: e.to_string(),
            },
            other => ClientError::BadResponse {
                url,
                reason: other.to_string(),
            },
        }
    }
}

/// Checks what `ureq` would accept but the CLI does not mean (another scheme, credentials, a
/// query the path would be appended to); returns the URL without its trailing slashes.
fn check_url(url: &str) -> Result<String, ClientError> {
    let invalid = |reason: &str| ClientError::InvalidUrl {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(invalid("expected http://HOST:PORT"));
    };
    if scheme.eq_ignore_ascii_case("https") {
        return Err(ClientError::Https {
            url: url.to_string(),
        });
    }
    if !scheme.eq_ignore_ascii_case("http") {
        return Err(invalid("only http:// URLs are supported"));
    }
    if rest.contains(['?', '#']) {
        return Err(invalid("a query or fragment is not allowed"));
    }
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.contains('@') {
        return Err(invalid(
            "credentials in the URL are not supported (set MOLTBOT_GATEWAY_TOKEN)",
        ));
    }
    let base = url.trim_end_matches('/').to_string();
    let uri: Uri = base
        .parse()
        .map_err(|e: http::uri::InvalidUri| ClientError::InvalidUrl {
            url: url.to_string(),
            reason: e.to_string(),
        })?;
    if uri.host().is_none_or(str::is_empty) {
        return Err(invalid("the host is missing"));
    }
    // `Uri` takes any digits as a port (and reports none when they exceed a u16).
    let authority = uri.authority().map_or("", |a| a.as_str());
    let after_host = authority
        .rsplit_once(']')
        .map_or(authority, |(_, rest)| rest);
    let port = after_host.rsplit_once(':').map(|(_, port)| port);
    if port.is_some_and(|p| !p.parse::<u16>().is_ok_and(|p| p != 0)) {
        return Err(invalid("the port must be a number in 1..=65535"));
    }
    Ok(base)
}

/// A fake gateway for tests of the client and of the commands that use it.
#[cfg(test)]
pub(crate) mod testing {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::mpsc;
    use std::thread::JoinHandle;

    /// Reads one request (head, then a Content-Length body).
    pub(crate) fn read_request(stream: &mut TcpStream) -> Vec<u8> {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut req = httparse::Request::new(&mut headers);
            if let Ok(httparse::Status::Complete(n)) = req.parse(&buf) {
                let len: usize = req
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| std::str::from_utf8(h.value).ok()?.parse().ok())
                    .unwrap_or(0);
                if buf.len() >= n + len {
                    return buf;
                }
            }
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return buf,
                Ok(k) => buf.extend_from_slice(&chunk[..k]),
            }
        }
    }

    /// Answers one connection per `(status, JSON body)` and closes it, sending each raw
    /// request back, then exits. Returns the server's `http://` URL.
    pub(crate) fn serve_json(
        responses: Vec<(u16, String)>,
    ) -> (String, mpsc::Receiver<String>, JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let (tx, rx) = mpsc::channel();
        let handle = std::thread::spawn(move || {
            for (status, body) in responses {
                let (mut stream, _) = listener.accept().expect("accept");
                let req = read_request(&mut stream);
                let _ = tx.send(String::from_utf8_lossy(&req).into_owned());
                let head = format!(
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                     Connection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(body.as_bytes());
            }
        });
        (url, rx, handle)
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpListener;

    use super::testing::{read_request, serve_json};
    use super::*;

    const T: Duration = Duration::from_secs(10);

    fn header<'a>(r: &'a Response, name: &str) -> Option<&'a str> {
        r.headers().get(name).and_then(|v| v.to_str().ok())
    }

    #[test]
    fn base_path_headers_and_body_are_sent() {
        let (url, rx, h) = serve_json(vec![(201, "{\"ok\":true}".into())]);
        let client = Client::new(&format!("{url}/base/"), T).expect("client");
        let resp = client
            .request(
                "POST",
                "/v1/echo",
                &[("authorization", "Bearer s3cret")],
                Some(b"hello"),
            )
            .expect("response");
        assert_eq!(resp.status(), 201);
        assert_eq!(header(&resp, "content-type"), Some("application/json"));
        assert_eq!(resp.body(), b"{\"ok\":true}");
        let req = rx.recv().expect("request");
        let lower = req.to_ascii_lowercase();
        assert!(req.starts_with("POST /base/v1/echo HTTP/1.1\r\n"), "{req}");
        assert!(
            lower.contains("\r\nauthorization: bearer s3cret\r\n"),
            "{req}"
        );
        assert!(lower.contains("\r\ncontent-length: 5\r\n"), "{req}");
        assert!(lower.contains("\r\nuser-agent: moltbot-cli/"), "{req}");
        assert!(req.ends_with("\r\n\r\nhello"), "{req}");
        h.join().expect("server");
    }

    #[test]
    fn error_statuses_are_answers() {
        let (url, _rx, h) = serve_json(vec![(503, "{}".into())]);
        let resp = Client::new(&url, T)
            .expect("client")
            .request("GET", "/status", &[], None)
            .expect("a 503 is an answer");
        assert_eq!(resp.status(), 503);
        h.join().expect("server");
    }

    #[test]
    fn refused_connection_says_what_to_do() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        drop(listener);
        let err = Client::new(&url, T)
            .expect("client")
            .request("GET", "/status", &[], None)
            .expect_err("refused");
        assert!(matches!(err, ClientError::Refused { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!("no gateway at {url}: connection refused (is `moltbot gateway` running?)")
        );
    }

    #[test]
    fn silent_server_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let h = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            let _ = read_request(&mut s);
            // No answer until the client gives up and closes.
            let mut sink = [0u8; 64];
            while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
        });
        let err = Client::new(&url, Duration::from_millis(200))
            .expect("client")
            .request("GET", "/", &[], None)
            .expect_err("timeout");
        assert!(matches!(err, ClientError::Timeout { .. }), "{err:?}");
        assert!(err.to_string().starts_with("no answer from"), "{err}");
        h.join().expect("server");
    }

    #[test]
    fn malformed_and_cut_short_answers_are_errors() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let answers: [&[u8]; 2] = [
            b"HTTX/1.1 200 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000000\r\n\r\nab",
        ];
        let h = std::thread::spawn(move || {
            for answer in answers {
                let (mut s, _) = listener.accept().expect("accept");
                let _ = read_request(&mut s);
                let _ = s.write_all(answer);
            }
        });
        let client = Client::new(&url, T).expect("client");
        for _ in answers {
            let err = client.request("GET", "/", &[], None).expect_err("bad");
            assert!(matches!(err, ClientError::BadResponse { .. }), "{err:?}");
            assert!(err.to_string().contains(&url), "{err}");
        }
        h.join().expect("server");
    }

    #[test]
    fn urls() {
        assert_eq!(
            check_url("http://[::1]:8080/base/").expect("v6"),
            "http://[::1]:8080/base"
        );
        assert_eq!(
            check_url("HTTP://localhost").expect("default port"),
            "HTTP://localhost"
        );
        let err = check_url("https://gw:18789").expect_err("https");
        assert!(matches!(err, ClientError::Https { .. }), "{err:?}");
        assert!(err.to_string().contains("https is not supported"), "{err}");
        for bad in [
            "127.0.0.1:18789",
            "ftp://h:1",
            "http://:1",
            "http://h:0",
            "http://h:99999",
            "http://h:x",
            "http://u:p@h:1",
            "http://h:1/?q",
            "http://[::1",
            "http://h h:1",
        ] {
            let err = check_url(bad).expect_err(bad);
            assert!(
                matches!(err, ClientError::InvalidUrl { .. }),
                "{bad}: {err:?}"
            );
        }
    }

    #[test]
    fn invalid_requests_are_refused_before_connecting() {
        // Port 1 on loopback: nothing is contacted because validation comes first.
        let client = Client::new("http://127.0.0.1:1", T).expect("client");
        type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)]);
        let cases: [Case<'_>; 4] = [
            ("GET", "status", &[]),
            ("GET", "/a b", &[]),
            ("G ET", "/", &[]),
            ("GET", "/", &[("authorization", "Bearer tok\nen")]),
        ];
        for (method, path, headers) in cases {
            let err = client.request(method, path, headers, None).expect_err(path);
            assert!(matches!(err, ClientError::InvalidRequest(_)), "{err:?}");
            assert!(!err.to_string().contains("tok\nen"), "token never echoed");
        }
    }
}
