//! HTTP/1.1 request parsing
