//! Signed tokens (JWT) from an identity provider: verification and the user id they carry.
