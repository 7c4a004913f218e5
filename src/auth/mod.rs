//! Who a request is: the credential it carries decides the user, never a field the client
//! merely claims. One check serves HTTP and WebSocket clients.
//!
//! Credentials: per-user tokens (stored hashed in the users file, [`users`]), signed tokens
//! from an identity provider ([`jwt`]), and the operator token (`MOLTBOT_GATEWAY_TOKEN`), which
//! may act for any user.

pub mod jwt;
pub mod users;
