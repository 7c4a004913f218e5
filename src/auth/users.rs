//! Per-user tokens: the users file (hashes only), its changes by `moltbot users`, and the
//! table the gateway looks tokens up in.
