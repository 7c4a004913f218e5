//! Signed tokens (JWT) from an identity provider: verification and the user id they carry.
//!
//! One key verifies, configured once ([`JwtVerifier::from_config`]): an HS256 secret
//! (`jwt_secret`, `jwt_secret_file`) or a public key (`jwt_public_key_file`, Ed25519 for EdDSA
//! or EC P-256 for ES256). Exactly one algorithm is accepted, the key's: the token's header is
//! never trusted to choose it, so `alg: none` and the classic confusion (an HS256 token whose
//! MAC key is the public key's bytes) are refused before any signature is computed. `exp` is
//! required, `nbf` honoured when present, both with `jwt_leeway`; `iss` and `aud` must be
//! present and match when `jwt_issuer` / `jwt_audience` are set. The user id is the string in
//! `jwt_user_claim`, validated like any user id.
//!
//! A refusal ([`JwtFailure`]) carries its reason for metrics and logs, and never any part of
//! the token: a bearer token in a log is a credential in a log.
//!
//! The crate is `jsonwebtoken` with its RustCrypto backend (pure Rust, nothing to build in C).

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::crypto::CryptoProvider;
use jsonwebtoken::errors::{Error as JwtError, ErrorKind};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::config::{Config, MAX_JWT_LEEWAY, hs256_secret};
use crate::user::validate_user_id;

/// Verifies signed tokens with the configured key and checks, and extracts their user id.
pub struct JwtVerifier {
    key: DecodingKey,
    /// The algorithm's name as the header must spell it (`"HS256"`, `"EdDSA"`, `"ES256"`).
    alg_name: &'static str,
    validation: Validation,
    user_claim: String,
}

// By hand: the key stays out of debug output, whatever the crate's `Debug` shows of it.
impl fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("algorithm", &self.alg_name)
            .field("issuer", &self.validation.iss)
            .field("audience", &self.validation.aud)
            .field("leeway_secs", &self.validation.leeway)
            .field("user_claim", &self.user_claim)
            .finish_non_exhaustive()
    }
}

/// Why a signed token was refused. Its `Display` never contains the token nor anything from
/// it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum JwtFailure {
    /// Validly signed, but `exp` is past (beyond the leeway).
    #[error("signed token expired")]
    Expired,
    /// Validly signed, but `nbf` is ahead (beyond the leeway).
    #[error("signed token not yet valid")]
    NotYetValid,
    /// Anything else: see the [`Defect`].
    #[error("invalid signed token: {0}")]
    Invalid(Defect),
}

impl JwtFailure {
    /// The label for metrics: `"expired"`, `"not_yet_valid"` or `"invalid"`.
    pub fn reason(&self) -> &'static str {
        match self {
            JwtFailure::Expired => "expired",
            JwtFailure::NotYetValid => "not_yet_valid",
            JwtFailure::Invalid(_) => "invalid",
        }
    }
}

/// What is wrong with an invalid signed token (for logs; metrics count them all as
/// `"invalid"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Defect {
    /// Not three base64url parts, or a header or payload that is not a JSON object.
    Malformed,
    /// The header names another algorithm than the key's (including `none`).
    Algorithm,
    /// The signature does not verify with the key.
    Signature,
    /// `exp` is missing or not a number.
    Expiry,
    /// `nbf` is not a number.
    NotBefore,
    /// `iss` is missing or not the configured issuer.
    Issuer,
    /// `aud` is missing or does not name the configured audience.
    Audience,
    /// The user claim is missing, not a string, or not a valid user id.
    UserClaim,
}

impl fmt::Display for Defect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Defect::Malformed => "malformed",
            Defect::Algorithm => "algorithm not accepted",
            Defect::Signature => "signature does not verify",
            Defect::Expiry => "exp missing or not a number",
            Defect::NotBefore => "nbf not a number",
            Defect::Issuer => "issuer missing or not accepted",
            Defect::Audience => "audience missing or not accepted",
            Defect::UserClaim => "user claim missing, not a string, or not a valid user id",
        })
    }
}

/// A key for signed tokens that cannot be used; said at start-up, naming the key or file.
#[derive(Debug, thiserror::Error)]
pub enum JwtConfigError {
    /// More than one of `jwt_secret`, `jwt_secret_file` and `jwt_public_key_file` is set
    /// (`Config::validate` refuses that too).
    #[error(
        "signed tokens are verified with one key: set only one of jwt_secret, jwt_secret_file and jwt_public_key_file"
    )]
    SeveralKeys,
    /// A key file could not be read.
    #[error("cannot read {key} {path}: {source}")]
    Read {
        /// `jwt_secret_file` or `jwt_public_key_file`.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The HS256 secret is too short (or empty).
    #[error("{origin}: {message}")]
    WeakSecret {
        /// `jwt_secret`, or `jwt_secret_file <path>`.
        origin: String,
        /// Its length and the minimum (never the secret).
        message: String,
    },
    /// The public key file holds no key the verifier can use.
    #[error("jwt_public_key_file {path}: {problem}")]
    PublicKey {
        /// The file.
        path: PathBuf,
        /// What it holds instead.
        problem: KeyProblem,
    },
    /// This build of the crate has no cryptography (its backend features are wrong).
    #[error("this build cannot verify signed tokens: jsonwebtoken has no crypto backend")]
    NoCrypto,
}

/// What is wrong with the public key file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyProblem {
    /// No PEM block at all.
    NotPem,
    /// A private key, where the public key belongs.
    PrivateKey,
    /// A certificate rather than its public key.
    Certificate,
    /// An RSA key (RS256 and PS256 are not accepted).
    Rsa,
    /// An EC key on another curve than P-256.
    OtherCurve,
    /// A PEM block of another kind (its label).
    OtherBlock(String),
    /// A `PUBLIC KEY` block that does not read as an Ed25519 or P-256 key.
    Unreadable,
}

impl fmt::Display for KeyProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const ACCEPTED: &str = "only Ed25519 (EdDSA) and EC P-256 (ES256) public keys are accepted";
        match self {
            KeyProblem::NotPem => {
                f.write_str("not a PEM file (expected a -----BEGIN PUBLIC KEY----- block)")
            }
            KeyProblem::PrivateKey => f.write_str(
                "holds a private key; give the public key only (openssl pkey -in KEY -pubout)",
            ),
            KeyProblem::Certificate => f.write_str(
                "holds a certificate; give its public key (openssl x509 -in CERT -pubkey -noout)",
            ),
            KeyProblem::Rsa => write!(f, "an RSA key; {ACCEPTED}"),
            KeyProblem::OtherCurve => {
                write!(f, "an EC key on another curve than P-256; {ACCEPTED}")
            }
            KeyProblem::OtherBlock(label) => {
                write!(f, "holds a PEM block {label:?}, not PUBLIC KEY; {ACCEPTED}")
            }
            KeyProblem::Unreadable => write!(f, "not a readable public key; {ACCEPTED}"),
        }
    }
}

impl JwtVerifier {
    /// The verifier of the configured key, or `None` when no key is configured (signed tokens
    /// are then not accepted at all). Reads the secret or public key file; the error names the
    /// key or file and what is wrong with it.
    pub fn from_config(config: &Config) -> Result<Option<JwtVerifier>, JwtConfigError> {
        if !config.jwt_configured() {
            return Ok(None);
        }
        // Before the keys: without a backend every key would look unusable.
        if CryptoProvider::try_get_default().is_none() {
            return Err(JwtConfigError::NoCrypto);
        }
        let (key, algorithm) = match (
            &config.jwt_secret,
            &config.jwt_secret_file,
            &config.jwt_public_key_file,
        ) {
            (Some(secret), None, None) => (
                hmac_key(secret.as_bytes(), || "jwt_secret".into())?,
                Algorithm::HS256,
            ),
            (None, Some(path), None) => {
                let bytes = read("jwt_secret_file", path)?;
                let secret = trim_line_break(&bytes);
                let origin = || format!("jwt_secret_file {}", path.display());
                (hmac_key(secret, origin)?, Algorithm::HS256)
            }
            (None, None, Some(path)) => {
                let pem = read("jwt_public_key_file", path)?;
                public_key(&pem).map_err(|problem| JwtConfigError::PublicKey {
                    path: path.clone(),
                    problem,
                })?
            }
            _ => return Err(JwtConfigError::SeveralKeys),
        };
        Ok(Some(JwtVerifier::new(key, algorithm, config)))
    }

    fn new(key: DecodingKey, algorithm: Algorithm, config: &Config) -> JwtVerifier {
        let mut validation = Validation::new(algorithm);
        // Clamped again, whether or not the config was validated: the crate computes
        // `now - leeway` in u64.
        validation.leeway = config.jwt_leeway.min(MAX_JWT_LEEWAY).as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        let mut required = vec!["exp"];
        if let Some(issuer) = &config.jwt_issuer {
            validation.set_issuer(&[issuer]);
            // Without this the crate lets a token with no `iss` pass.
            required.push("iss");
        }
        match &config.jwt_audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                required.push("aud");
            }
            // Not configured, not checked: the crate would otherwise refuse every token that
            // names an audience.
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        JwtVerifier {
            key,
            alg_name: alg_name(algorithm),
            validation,
            user_claim: config.jwt_user_claim.clone(),
        }
    }

    /// The one algorithm accepted: `"HS256"`, `"EdDSA"` or `"ES256"`.
    pub fn algorithm(&self) -> &'static str {
        self.alg_name
    }

    /// Verifies `token` (the bearer token, without `Bearer `) and returns the user id from the
    /// configured claim.
    pub fn verify(&self, token: &str) -> Result<String, JwtFailure> {
        self.check_header(token)?;
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &self.key, &self.validation)
            .map_err(failure)?;
        match data.claims.get(&self.user_claim) {
            Some(Value::String(user)) => validate_user_id(user)
                .map(str::to_owned)
                .map_err(|_| JwtFailure::Invalid(Defect::UserClaim)),
            _ => Err(JwtFailure::Invalid(Defect::UserClaim)),
        }
    }

    /// The shape and the header's `alg`, before the crate sees the token: the algorithm is
    /// ours to choose, and a refusal here costs no signature check. (The crate's `Validation`
    /// allows only the same one algorithm too.)
    fn check_header(&self, token: &str) -> Result<(), JwtFailure> {
        #[derive(Deserialize)]
        struct Header {
            alg: String,
        }
        let malformed = JwtFailure::Invalid(Defect::Malformed);
        let mut parts = token.split('.');
        let (Some(header), Some(_), Some(_), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed);
        };
        let json = URL_SAFE_NO_PAD.decode(header).map_err(|_| malformed)?;
        let header: Header = serde_json::from_slice(&json).map_err(|_| malformed)?;
        if header.alg == self.alg_name {
            Ok(())
        } else {
            Err(JwtFailure::Invalid(Defect::Algorithm))
        }
    }
}

/// Whether `token` has the shape of a signed token: three non-empty base64url parts separated
/// by dots. Cheap, for telling token kinds apart (a per-user token, `mbt_...`, has no dot); it
/// says nothing of validity.
pub fn looks_like_jwt(token: &str) -> bool {
    let mut parts = 0;
    for part in token.split('.') {
        parts += 1;
        if parts > 3
            || part.is_empty()
            || !part
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return false;
        }
    }
    parts == 3
}

fn alg_name(algorithm: Algorithm) -> &'static str {
    match algorithm {
        Algorithm::HS256 => "HS256",
        Algorithm::EdDSA => "EdDSA",
        Algorithm::ES256 => "ES256",
        // `from_config` makes no other.
        _ => "unsupported",
    }
}

/// A refusal of the crate as ours. Only fixed texts come out: the crate's own messages may
/// quote the token (a JSON error shows the text it choked on).
fn failure(e: JwtError) -> JwtFailure {
    let defect = match e.kind() {
        ErrorKind::ExpiredSignature => return JwtFailure::Expired,
        ErrorKind::ImmatureSignature => return JwtFailure::NotYetValid,
        ErrorKind::InvalidSignature => Defect::Signature,
        ErrorKind::InvalidAlgorithm
        | ErrorKind::MissingAlgorithm
        | ErrorKind::UnsupportedAlgorithm
        | ErrorKind::InvalidAlgorithmName => Defect::Algorithm,
        ErrorKind::InvalidIssuer => Defect::Issuer,
        ErrorKind::InvalidAudience => Defect::Audience,
        ErrorKind::MissingRequiredClaim(claim) | ErrorKind::InvalidClaimFormat(claim) => {
            match claim.as_str() {
                "exp" => Defect::Expiry,
                "nbf" => Defect::NotBefore,
                "iss" => Defect::Issuer,
                "aud" => Defect::Audience,
                _ => Defect::Malformed,
            }
        }
        ErrorKind::InvalidToken
        | ErrorKind::Base64(_)
        | ErrorKind::Json(_)
        | ErrorKind::Utf8(_) => Defect::Malformed,
        // Key errors cannot happen: `from_config` built the crate's verifier once already.
        // Whatever else a later version adds, the token was not verified.
        _ => Defect::Signature,
    };
    JwtFailure::Invalid(defect)
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, JwtConfigError> {
    std::fs::read(path).map_err(|source| JwtConfigError::Read {
        key,
        path: path.to_path_buf(),
        source,
    })
}

/// The file's bytes without one trailing line break (`echo secret > file` writes one, which the
/// identity provider's copy of the secret does not have). So the secret is text: a binary one
/// whose last byte is a line feed would lose it.
fn trim_line_break(bytes: &[u8]) -> &[u8] {
    let bytes = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    bytes.strip_suffix(b"\r").unwrap_or(bytes)
}

fn hmac_key(secret: &[u8], origin: impl Fn() -> String) -> Result<DecodingKey, JwtConfigError> {
    let weak = |message| JwtConfigError::WeakSecret {
        origin: origin(),
        message,
    };
    hs256_secret(secret).map_err(weak)?;
    let key = DecodingKey::from_secret(secret).map_err(|_| weak("is empty".into()))?;
    Ok(key)
}

/// The public key in `pem` and its algorithm, from the key's type.
fn public_key(pem: &[u8]) -> Result<(DecodingKey, Algorithm), KeyProblem> {
    match pem_label(pem) {
        None => return Err(KeyProblem::NotPem),
        Some("PUBLIC KEY") => {}
        Some(label) if label.ends_with("PRIVATE KEY") => return Err(KeyProblem::PrivateKey),
        Some("CERTIFICATE" | "TRUSTED CERTIFICATE") => return Err(KeyProblem::Certificate),
        Some("RSA PUBLIC KEY") => return Err(KeyProblem::Rsa),
        Some(label) => return Err(KeyProblem::OtherBlock(label.chars().take(40).collect())),
    }
    if let Ok(key) = DecodingKey::from_ed_pem(pem) {
        // The crate slices the first 32 bytes when it builds its verifier, which panics on a
        // shorter (corrupt) key: checked here first.
        if key.try_get_as_bytes().map_or(true, |b| b.len() != 32) || !usable(&key, Algorithm::EdDSA)
        {
            return Err(KeyProblem::Unreadable);
        }
        return Ok((key, Algorithm::EdDSA));
    }
    if let Ok(key) = DecodingKey::from_ec_pem(pem) {
        // Any named curve reads as EC; only a P-256 point builds an ES256 verifier (P-384 has
        // longer points, and a secp256k1 point is not on P-256).
        return if usable(&key, Algorithm::ES256) {
            Ok((key, Algorithm::ES256))
        } else {
            Err(KeyProblem::OtherCurve)
        };
    }
    if DecodingKey::from_rsa_pem(pem).is_ok() {
        return Err(KeyProblem::Rsa);
    }
    Err(KeyProblem::Unreadable)
}

/// The label of the first PEM block (`PUBLIC KEY`), if any.
fn pem_label(pem: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(pem).ok()?;
    text.lines().find_map(|line| {
        line.trim()
            .strip_prefix("-----BEGIN ")?
            .strip_suffix("-----")
    })
}

/// Whether the crate builds a verifier of `algorithm` for `key`: `decode` builds one per token,
/// so a key it cannot use would refuse every token; this finds out at start-up. An empty
/// signature never verifies, so a usable key answers `Ok(false)`.
fn usable(key: &DecodingKey, algorithm: Algorithm) -> bool {
    matches!(
        jsonwebtoken::crypto::verify("", b"", key, algorithm),
        Ok(false)
    )
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;
    use std::time::Duration;

    use jsonwebtoken::{EncodingKey, Header, encode, get_current_timestamp};
    use serde_json::json;

    use super::*;

    const SECRET: &str = "test-only-hs256-secret-0123456789abcdef";
    const ED_PRIVATE: &[u8] = include_bytes!("../../tests/data/jwt/ed25519-private.pem");
    const ED_PUBLIC: &[u8] = include_bytes!("../../tests/data/jwt/ed25519-public.pem");
    const ED_OTHER_PRIVATE: &[u8] =
        include_bytes!("../../tests/data/jwt/ed25519-other-private.pem");
    const P256_PRIVATE: &[u8] = include_bytes!("../../tests/data/jwt/p256-private.pem");
    const P256_PUBLIC: &[u8] = include_bytes!("../../tests/data/jwt/p256-public.pem");
    const P256_OTHER_PRIVATE: &[u8] = include_bytes!("../../tests/data/jwt/p256-other-private.pem");
    const P384_PUBLIC: &[u8] = include_bytes!("../../tests/data/jwt/p384-public.pem");
    const SECP256K1_PUBLIC: &[u8] = include_bytes!("../../tests/data/jwt/secp256k1-public.pem");
    const RSA_PUBLIC: &[u8] = include_bytes!("../../tests/data/jwt/rsa-public.pem");

    /// In user ids and claims of refused tokens: it must never show in a failure's text.
    const CANARY: &str = "leak-canary";

    fn now() -> u64 {
        get_current_timestamp()
    }

    /// Claims of a token for `user`, valid for ten minutes.
    fn claims(user: &str) -> Value {
        json!({ "sub": user, "exp": now() + 600 })
    }

    fn with(mut claims: Value, extra: Value) -> Value {
        let (Value::Object(c), Value::Object(e)) = (&mut claims, extra) else {
            panic!("claims are objects");
        };
        c.extend(e);
        claims
    }

    fn without(mut claims: Value, name: &str) -> Value {
        claims.as_object_mut().unwrap().remove(name);
        claims
    }

    fn mint(alg: Algorithm, key: &EncodingKey, claims: &Value) -> String {
        encode(&Header::new(alg), claims, key).unwrap()
    }

    fn hs256_with(secret: &[u8], claims: &Value) -> String {
        mint(
            Algorithm::HS256,
            &EncodingKey::from_secret(secret).unwrap(),
            claims,
        )
    }

    fn hs256(claims: &Value) -> String {
        hs256_with(SECRET.as_bytes(), claims)
    }

    fn eddsa(private: &[u8], claims: &Value) -> String {
        mint(
            Algorithm::EdDSA,
            &EncodingKey::from_ed_pem(private).unwrap(),
            claims,
        )
    }

    fn es256(private: &[u8], claims: &Value) -> String {
        mint(
            Algorithm::ES256,
            &EncodingKey::from_ec_pem(private).unwrap(),
            claims,
        )
    }

    fn b64(v: &Value) -> String {
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
    }

    fn file(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    /// The verifier of a validated config with the HS256 secret and `set` applied.
    fn verifier(set: impl FnOnce(&mut Config)) -> JwtVerifier {
        let mut c = Config {
            jwt_secret: Some(SECRET.into()),
            ..Config::default()
        };
        set(&mut c);
        c.validate().unwrap();
        JwtVerifier::from_config(&c).unwrap().unwrap()
    }

    fn secret_verifier() -> JwtVerifier {
        verifier(|_| {})
    }

    fn pem_verifier(public: &[u8]) -> JwtVerifier {
        let f = file(public);
        verifier(|c| {
            c.jwt_secret = None;
            c.jwt_public_key_file = Some(f.path().into());
        })
    }

    /// Asserts the refusal, and that its text shows nothing of the token.
    fn refused(v: &JwtVerifier, token: &str, want: JwtFailure) {
        let got = v.verify(token);
        assert_eq!(got, Err(want), "{token}");
        for text in [want.to_string(), format!("{want:?}")] {
            assert!(!text.contains(CANARY), "{text}");
            for part in token.split('.').filter(|p| p.len() >= 4) {
                assert!(!text.contains(part), "{text} shows {part}");
            }
        }
    }

    fn invalid(defect: Defect) -> JwtFailure {
        JwtFailure::Invalid(defect)
    }

    fn config_error(c: &Config) -> JwtConfigError {
        JwtVerifier::from_config(c).unwrap_err()
    }

    // Accepted tokens.

    #[test]
    fn valid_tokens_of_each_algorithm_give_their_user() {
        let v = secret_verifier();
        assert_eq!(v.algorithm(), "HS256");
        assert_eq!(v.verify(&hs256(&claims("alice"))).unwrap(), "alice");

        let v = pem_verifier(ED_PUBLIC);
        assert_eq!(v.algorithm(), "EdDSA");
        assert_eq!(v.verify(&eddsa(ED_PRIVATE, &claims("bob"))).unwrap(), "bob");

        let v = pem_verifier(P256_PUBLIC);
        assert_eq!(v.algorithm(), "ES256");
        assert_eq!(
            v.verify(&es256(P256_PRIVATE, &claims("carol"))).unwrap(),
            "carol"
        );

        // Any valid user id, as it is: no normalisation.
        let v = secret_verifier();
        for user in ["User-A", "a b", "ü@example.org", "👩\u{200d}💻", "x/../y"] {
            assert_eq!(v.verify(&hs256(&claims(user))).unwrap(), user);
        }
    }

    #[test]
    fn the_user_comes_from_the_configured_claim() {
        let v = verifier(|c| c.jwt_user_claim = "uid".into());
        let token = hs256(&with(claims("not-this"), json!({ "uid": "dave" })));
        assert_eq!(v.verify(&token).unwrap(), "dave");
        refused(&v, &hs256(&claims("not-this")), invalid(Defect::UserClaim));
    }

    // Refused: shape, algorithm, signature.

    #[test]
    fn garbage_is_malformed() {
        let v = secret_verifier();
        for token in [
            "",
            "garbage",
            "a.b",
            "a.b.c",
            "a.b.c.d",
            "..",
            "mbt_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "Bearer x.y.z",
        ] {
            refused(&v, token, invalid(Defect::Malformed));
        }
        // A header that is base64url but not JSON, or JSON without `alg`.
        let not_json = format!(
            "{}.{}.sig",
            URL_SAFE_NO_PAD.encode("alg"),
            b64(&claims("a"))
        );
        refused(&v, &not_json, invalid(Defect::Malformed));
        let no_alg = format!(
            "{}.{}.sig",
            b64(&json!({ "typ": "JWT" })),
            b64(&claims("a"))
        );
        refused(&v, &no_alg, invalid(Defect::Malformed));
        // A payload that is not a JSON object, validly signed.
        refused(&v, &hs256(&json!([CANARY, 1])), invalid(Defect::Malformed));
    }

    #[test]
    fn a_cut_or_tampered_token_does_not_verify() {
        for (v, token) in [
            (secret_verifier(), hs256(&claims(CANARY))),
            (pem_verifier(ED_PUBLIC), eddsa(ED_PRIVATE, &claims(CANARY))),
            (
                pem_verifier(P256_PUBLIC),
                es256(P256_PRIVATE, &claims(CANARY)),
            ),
        ] {
            let (message, signature) = token.rsplit_once('.').unwrap();
            // 40 characters decode whole (no partial base64 group): a short signature.
            refused(
                &v,
                &format!("{message}.{}", &signature[..40]),
                invalid(Defect::Signature),
            );
            refused(&v, &format!("{message}."), invalid(Defect::Signature));
            // Another user in the payload under the original signature.
            let (header, _) = message.split_once('.').unwrap();
            let forged = format!("{header}.{}.{signature}", b64(&claims("mallory")));
            refused(&v, &forged, invalid(Defect::Signature));
        }
    }

    #[test]
    fn a_token_signed_by_another_key_does_not_verify() {
        let other_secret = "another-secret-that-is-also-32-bytes-long";
        refused(
            &secret_verifier(),
            &hs256_with(other_secret.as_bytes(), &claims(CANARY)),
            invalid(Defect::Signature),
        );
        refused(
            &pem_verifier(ED_PUBLIC),
            &eddsa(ED_OTHER_PRIVATE, &claims(CANARY)),
            invalid(Defect::Signature),
        );
        refused(
            &pem_verifier(P256_PUBLIC),
            &es256(P256_OTHER_PRIVATE, &claims(CANARY)),
            invalid(Defect::Signature),
        );
        // Expired and badly signed: "expired" is only ever said of a genuine token.
        let stale = json!({ "sub": CANARY, "exp": now() - 3600 });
        refused(
            &secret_verifier(),
            &hs256_with(other_secret.as_bytes(), &stale),
            invalid(Defect::Signature),
        );
    }

    #[test]
    fn alg_none_is_refused() {
        let token = format!(
            "{}.{}.",
            b64(&json!({ "alg": "none", "typ": "JWT" })),
            b64(&claims(CANARY))
        );
        for v in [
            secret_verifier(),
            pem_verifier(ED_PUBLIC),
            pem_verifier(P256_PUBLIC),
        ] {
            refused(&v, &token, invalid(Defect::Algorithm));
            // With a signature part too, and spelt otherwise.
            refused(&v, &format!("{token}c2ln"), invalid(Defect::Algorithm));
            let none = format!(
                "{}.{}.",
                b64(&json!({ "alg": "None" })),
                b64(&claims(CANARY))
            );
            refused(&v, &none, invalid(Defect::Algorithm));
        }
    }

    /// The classic algorithm confusion: an HS256 token whose MAC key is the public key, which
    /// anyone has. A verifier that let the header choose would compute that MAC with the PEM
    /// bytes and accept.
    #[test]
    fn an_hs256_token_keyed_with_the_public_key_is_refused() {
        for public in [ED_PUBLIC, P256_PUBLIC] {
            let v = pem_verifier(public);
            let token = hs256_with(public, &claims(CANARY));
            refused(&v, &token, invalid(Defect::Algorithm));
            // Nor would the crate, behind the header check: it allows the key's one algorithm.
            let e = jsonwebtoken::decode::<Map<String, Value>>(&token, &v.key, &v.validation)
                .unwrap_err();
            assert!(matches!(e.kind(), ErrorKind::InvalidAlgorithm), "{e:?}");
        }
    }

    #[test]
    fn only_the_keys_own_algorithm_is_accepted() {
        // Same secret, another HMAC.
        let hs384 = mint(
            Algorithm::HS384,
            &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
            &claims(CANARY),
        );
        refused(&secret_verifier(), &hs384, invalid(Defect::Algorithm));
        // A genuine token of the other public-key algorithm.
        refused(
            &pem_verifier(P256_PUBLIC),
            &eddsa(ED_PRIVATE, &claims(CANARY)),
            invalid(Defect::Algorithm),
        );
        refused(
            &pem_verifier(ED_PUBLIC),
            &es256(P256_PRIVATE, &claims(CANARY)),
            invalid(Defect::Algorithm),
        );
        // The name is case-sensitive (RFC 7515).
        let token = hs256(&claims(CANARY));
        let (_, rest) = token.split_once('.').unwrap();
        let lower = format!("{}.{rest}", b64(&json!({ "alg": "hs256", "typ": "JWT" })));
        refused(&secret_verifier(), &lower, invalid(Defect::Algorithm));
    }

    // Refused: time.

    #[test]
    fn expiry_with_the_leeway() {
        let v = secret_verifier(); // 30s leeway
        let exp = |offset: i64| json!({ "sub": "a", "exp": now().saturating_add_signed(offset) });
        refused(&v, &hs256(&exp(-120)), JwtFailure::Expired);
        assert_eq!(
            v.verify(&hs256(&exp(-10))).unwrap(),
            "a",
            "within the leeway"
        );
        let strict = verifier(|c| c.jwt_leeway = Duration::ZERO);
        refused(&strict, &hs256(&exp(-2)), JwtFailure::Expired);
        assert_eq!(strict.verify(&hs256(&exp(60))).unwrap(), "a");
    }

    #[test]
    fn exp_is_required_and_a_number() {
        let v = secret_verifier();
        refused(
            &v,
            &hs256(&without(claims(CANARY), "exp")),
            invalid(Defect::Expiry),
        );
        for bad in [json!("tomorrow"), json!(null), json!(-5), json!({})] {
            let token = hs256(&json!({ "sub": CANARY, "exp": bad }));
            refused(&v, &token, invalid(Defect::Expiry));
        }
    }

    #[test]
    fn not_before_with_the_leeway() {
        let v = secret_verifier();
        let nbf = |offset: u64| with(claims("a"), json!({ "nbf": now() + offset }));
        refused(&v, &hs256(&nbf(120)), JwtFailure::NotYetValid);
        assert_eq!(
            v.verify(&hs256(&nbf(10))).unwrap(),
            "a",
            "within the leeway"
        );
        let past = with(claims("a"), json!({ "nbf": now() - 60 }));
        assert_eq!(v.verify(&hs256(&past)).unwrap(), "a");
        let bad = with(claims(CANARY), json!({ "nbf": "soon" }));
        refused(&v, &hs256(&bad), invalid(Defect::NotBefore));
    }

    // Refused: issuer and audience.

    #[test]
    fn issuer_is_checked_when_configured() {
        let v = verifier(|c| c.jwt_issuer = Some("https://idp.example".into()));
        let iss = |iss: Value| hs256(&with(claims("a"), json!({ "iss": iss })));
        assert_eq!(v.verify(&iss(json!("https://idp.example"))).unwrap(), "a");
        refused(
            &v,
            &iss(json!("https://evil.example")),
            invalid(Defect::Issuer),
        );
        refused(
            &v,
            &iss(json!("https://idp.example/")),
            invalid(Defect::Issuer),
        );
        refused(&v, &iss(json!(7)), invalid(Defect::Issuer));
        refused(&v, &hs256(&claims("a")), invalid(Defect::Issuer));
        // Not configured: any issuer.
        let open = secret_verifier();
        assert_eq!(
            open.verify(&iss(json!("https://any.example"))).unwrap(),
            "a"
        );
    }

    #[test]
    fn audience_is_checked_when_configured() {
        let v = verifier(|c| c.jwt_audience = Some("moltbot".into()));
        let aud = |aud: Value| hs256(&with(claims("a"), json!({ "aud": aud })));
        assert_eq!(v.verify(&aud(json!("moltbot"))).unwrap(), "a");
        assert_eq!(v.verify(&aud(json!(["other", "moltbot"]))).unwrap(), "a");
        refused(&v, &aud(json!("other")), invalid(Defect::Audience));
        refused(&v, &aud(json!(["other"])), invalid(Defect::Audience));
        refused(&v, &aud(json!([])), invalid(Defect::Audience));
        refused(&v, &aud(json!(1)), invalid(Defect::Audience));
        refused(&v, &hs256(&claims("a")), invalid(Defect::Audience));
        // Not configured: a token for any audience, or none.
        let open = secret_verifier();
        assert_eq!(open.verify(&aud(json!("elsewhere"))).unwrap(), "a");
        assert_eq!(open.verify(&aud(json!(["x", "y"]))).unwrap(), "a");
    }

    // Refused: the user claim.

    #[test]
    fn the_user_claim_must_be_a_valid_user_id_string() {
        let v = secret_verifier();
        refused(
            &v,
            &hs256(&without(claims("a"), "sub")),
            invalid(Defect::UserClaim),
        );
        let uid = verifier(|c| c.jwt_user_claim = "uid".into());
        let bad_ids = [
            json!(42),
            json!(null),
            json!(true),
            json!(""),
            json!(format!("{CANARY}\u{7}")),
            json!(format!("{CANARY}\nadmin")),
            json!(format!("{CANARY}\u{202e}")),
            json!("x".repeat(crate::user::MAX_USER_ID_BYTES + 1)),
        ];
        for bad in bad_ids {
            let token = hs256(&json!({ "sub": bad, "exp": now() + 600 }));
            refused(&v, &token, invalid(Defect::UserClaim));
            let token = hs256(&json!({ "sub": "a", "uid": bad, "exp": now() + 600 }));
            refused(&uid, &token, invalid(Defect::UserClaim));
        }
        for bad in [json!([CANARY]), json!({ "id": CANARY })] {
            let token = hs256(&json!({ "sub": "a", "uid": bad, "exp": now() + 600 }));
            refused(&uid, &token, invalid(Defect::UserClaim));
            // The crate reads `sub` itself, as a string: a list or an object there does not
            // get as far as the user claim.
            let token = hs256(&json!({ "sub": bad, "exp": now() + 600 }));
            refused(&v, &token, invalid(Defect::Malformed));
        }
        // At the limit.
        let longest = "x".repeat(crate::user::MAX_USER_ID_BYTES);
        assert_eq!(v.verify(&hs256(&claims(&longest))).unwrap(), longest);
    }

    // The failure's text and reason.

    #[test]
    fn failures_carry_a_reason_and_no_token() {
        assert_eq!(JwtFailure::Expired.reason(), "expired");
        assert_eq!(JwtFailure::NotYetValid.reason(), "not_yet_valid");
        for d in [
            Defect::Malformed,
            Defect::Algorithm,
            Defect::Signature,
            Defect::Expiry,
            Defect::NotBefore,
            Defect::Issuer,
            Defect::Audience,
            Defect::UserClaim,
        ] {
            assert_eq!(invalid(d).reason(), "invalid");
            assert!(invalid(d).to_string().starts_with("invalid signed token: "));
        }
        // The crate's own message would quote the payload; ours does not.
        let v = secret_verifier();
        let token = hs256(&json!(CANARY));
        let e =
            jsonwebtoken::decode::<Map<String, Value>>(&token, &v.key, &v.validation).unwrap_err();
        assert!(e.to_string().contains(CANARY), "the crate's text: {e}");
        refused(&v, &token, invalid(Defect::Malformed));
    }

    #[test]
    fn the_verifier_is_shareable_and_its_debug_shows_no_key() {
        fn shareable<T: Send + Sync>() {}
        shareable::<JwtVerifier>();
        let text = format!("{:?}", secret_verifier());
        assert!(text.contains("HS256"), "{text}");
        assert!(!text.contains(SECRET), "{text}");
    }

    // The shape test.

    #[test]
    fn looks_like_jwt_is_the_shape_only() {
        assert!(looks_like_jwt(&hs256(&claims("a"))));
        assert!(looks_like_jwt(&eddsa(ED_PRIVATE, &claims("a"))));
        assert!(looks_like_jwt("a.b.c"));
        assert!(looks_like_jwt("aA0-_.b.c"));
        // A per-user token: `mbt_` and 43 base64url characters, no dot.
        assert!(!looks_like_jwt(
            "mbt_abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQ"
        ));
        for not in [
            "", ".", "..", "a.b", "a.b.", ".b.c", "a..c", "a.b.c.d", "a.b.c.", "a=.b.c", "a.b+.c",
            "a.b/.c", "a b.c.d", "a.b.c\n", "é.b.c",
        ] {
            assert!(!looks_like_jwt(not), "{not:?}");
        }
        // An unsigned token has an empty third part: not even the shape.
        let none = format!("{}.{}.", b64(&json!({ "alg": "none" })), b64(&claims("a")));
        assert!(!looks_like_jwt(&none));
    }

    // from_config.

    #[test]
    fn no_key_no_verifier() {
        assert!(
            JwtVerifier::from_config(&Config::default())
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn the_secret_file_is_read_without_its_line_break() {
        for content in [
            SECRET.to_string(),
            format!("{SECRET}\n"),
            format!("{SECRET}\r\n"),
        ] {
            let f = file(content.as_bytes());
            let v = verifier(|c| {
                c.jwt_secret = None;
                c.jwt_secret_file = Some(f.path().into());
            });
            assert_eq!(v.algorithm(), "HS256");
            assert_eq!(v.verify(&hs256(&claims("a"))).unwrap(), "a", "{content:?}");
        }
        // Only one line break goes: the rest is part of the secret.
        let f = file(format!("{SECRET}\n\n").as_bytes());
        let v = verifier(|c| {
            c.jwt_secret = None;
            c.jwt_secret_file = Some(f.path().into());
        });
        refused(&v, &hs256(&claims("a")), invalid(Defect::Signature));
        assert!(
            v.verify(&hs256_with(format!("{SECRET}\n").as_bytes(), &claims("a")))
                .is_ok()
        );
    }

    fn secret_file_config(path: &Path) -> Config {
        Config {
            jwt_secret_file: Some(path.into()),
            ..Config::default()
        }
    }

    fn public_key_config(path: &Path) -> Config {
        Config {
            jwt_public_key_file: Some(path.into()),
            ..Config::default()
        }
    }

    #[test]
    fn secret_file_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-such-secret");
        let e = config_error(&secret_file_config(&missing));
        assert!(
            matches!(&e, JwtConfigError::Read { key: "jwt_secret_file", path, .. } if *path == missing),
            "{e:?}"
        );
        let text = e.to_string();
        assert!(
            text.contains("jwt_secret_file") && text.contains("no-such-secret"),
            "{text}"
        );

        let e = config_error(&secret_file_config(dir.path()));
        assert!(
            matches!(e, JwtConfigError::Read { .. }),
            "a directory: {e:?}"
        );

        for (content, len) in [("", 0), ("\n", 0), ("short\n", 5), (&SECRET[..31], 31)] {
            let f = file(content.as_bytes());
            let e = config_error(&secret_file_config(f.path()));
            assert!(matches!(e, JwtConfigError::WeakSecret { .. }), "{e:?}");
            let text = e.to_string();
            assert!(text.contains(&f.path().display().to_string()), "{text}");
            assert!(text.contains(&format!("is {len} bytes")), "{text}");
            assert!(
                content.len() < 4 || !text.contains(content.trim()),
                "{text}"
            );
        }
    }

    #[test]
    fn the_secret_from_an_unvalidated_config_is_checked_too() {
        let c = Config {
            jwt_secret: Some("hunter2".into()),
            ..Config::default()
        };
        let e = config_error(&c);
        assert!(matches!(e, JwtConfigError::WeakSecret { .. }), "{e:?}");
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }

    #[test]
    fn public_key_file_errors_name_the_file_and_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-such-key.pem");
        let e = config_error(&public_key_config(&missing));
        assert!(
            matches!(
                &e,
                JwtConfigError::Read {
                    key: "jwt_public_key_file",
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("no-such-key.pem"), "{e}");

        // A 16-byte Ed25519 key: reads as Ed25519, and the crate would panic building its
        // verifier.
        let mut short_ed = vec![
            0x30, 0x1a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x11, 0x00,
        ];
        short_ed.extend([7u8; 16]);
        let short_ed = format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            base64::engine::general_purpose::STANDARD.encode(short_ed)
        );
        let cases: [(&[u8], KeyProblem); 11] = [
            (b"", KeyProblem::NotPem),
            (
                b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI user@host\n",
                KeyProblem::NotPem,
            ),
            (&[0xff, 0xfe, 0x00], KeyProblem::NotPem),
            (ED_PRIVATE, KeyProblem::PrivateKey),
            (P256_PRIVATE, KeyProblem::PrivateKey),
            (
                b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
                KeyProblem::Certificate,
            ),
            (RSA_PUBLIC, KeyProblem::Rsa),
            (P384_PUBLIC, KeyProblem::OtherCurve),
            (SECP256K1_PUBLIC, KeyProblem::OtherCurve),
            (
                b"-----BEGIN EC PARAMETERS-----\nBggqhkjOPQMBBw==\n-----END EC PARAMETERS-----\n",
                KeyProblem::OtherBlock("EC PARAMETERS".into()),
            ),
            (
                b"-----BEGIN PUBLIC KEY-----\nbm90IGEga2V5\n-----END PUBLIC KEY-----\n",
                KeyProblem::Unreadable,
            ),
        ];
        for (content, problem) in cases {
            let f = file(content);
            let e = config_error(&public_key_config(f.path()));
            match &e {
                JwtConfigError::PublicKey { path, problem: got } => {
                    assert_eq!(got, &problem, "{e}");
                    assert_eq!(path, f.path());
                }
                other => panic!("{problem:?}: {other:?}"),
            }
            assert!(
                e.to_string().contains(&f.path().display().to_string()),
                "{e}"
            );
        }
        let f = file(short_ed.as_bytes());
        let e = config_error(&public_key_config(f.path()));
        assert!(
            matches!(
                &e,
                JwtConfigError::PublicKey {
                    problem: KeyProblem::Unreadable,
                    ..
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn one_key_at_most_even_unvalidated() {
        let f = file(ED_PUBLIC);
        let c = Config {
            jwt_secret: Some(SECRET.into()),
            jwt_public_key_file: Some(f.path().into()),
            ..Config::default()
        };
        assert!(c.validate().is_err());
        assert!(matches!(config_error(&c), JwtConfigError::SeveralKeys));
    }

    #[test]
    fn an_unvalidated_leeway_is_clamped() {
        let c = Config {
            jwt_secret: Some(SECRET.into()),
            jwt_leeway: Duration::from_secs(100 * 365 * 24 * 3600),
            ..Config::default()
        };
        assert!(c.validate().is_err());
        let v = JwtVerifier::from_config(&c).unwrap().unwrap();
        let exp = |ago: u64| json!({ "sub": "a", "exp": now() - ago });
        assert_eq!(v.verify(&hs256(&exp(60))).unwrap(), "a");
        refused(
            &v,
            &hs256(&exp(MAX_JWT_LEEWAY.as_secs() + 60)),
            JwtFailure::Expired,
        );
    }

    /// What the gateway will do: resolve the layers, then build the verifier.
    #[test]
    fn from_resolved_flags_and_environment() {
        let f = file(P256_PUBLIC);
        let path = f.path().to_str().unwrap();
        let c = Config::resolve(
            None,
            Vec::new(),
            [
                ("jwt_public_key_file", path),
                ("jwt_issuer", "https://idp.example"),
                ("jwt_audience", "moltbot"),
                ("jwt_user_claim", "email"),
                ("jwt_leeway", "5s"),
            ],
        )
        .unwrap();
        let v = JwtVerifier::from_config(&c).unwrap().unwrap();
        let good = json!({
            "iss": "https://idp.example",
            "aud": "moltbot",
            "email": "erin@example.org",
            "exp": now() + 60,
        });
        assert_eq!(
            v.verify(&es256(P256_PRIVATE, &good)).unwrap(),
            "erin@example.org"
        );
        let stale = with(good.clone(), json!({ "exp": now() - 20 }));
        refused(&v, &es256(P256_PRIVATE, &stale), JwtFailure::Expired);

        let secret_file = file(format!("{SECRET}\n").as_bytes());
        let c = Config::resolve(
            None,
            vec![(
                "MOLTBOT_JWT_SECRET_FILE".to_string(),
                secret_file.path().to_str().unwrap().to_string(),
            )],
            Vec::new(),
        )
        .unwrap();
        let v = JwtVerifier::from_config(&c).unwrap().unwrap();
        assert_eq!(v.verify(&hs256(&claims("frank"))).unwrap(), "frank");
    }
}
