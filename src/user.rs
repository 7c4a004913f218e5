//! User identity: validation of user ids and session names, and the file-name-safe encoding
//! used wherever a file is named after a user.
//!
//! A user id comes from the network (a header or a JSON field) and is hostile until validated.
//! It never becomes a path by string joining: files named after users go through
//! [`safe_file_stem`], and session names go through [`validate_name`].

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// The longest accepted user id, in bytes of UTF-8.
pub const MAX_USER_ID_BYTES: usize = 128;

/// The longest accepted session name, in bytes.
pub const MAX_NAME_BYTES: usize = 64;

/// The first character of an encoded (non-plain) file stem; it never occurs in a plain stem.
const ENCODED_PREFIX: char = '~';

/// Why a user id was rejected (the gateway answers 400 with this message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserIdError {
    /// The id is the empty string.
    #[error("user id is empty")]
    Empty,
    /// The id is longer than [`MAX_USER_ID_BYTES`].
    #[error("user id is {len} bytes long; the limit is {MAX_USER_ID_BYTES}")]
    TooLong {
        /// Length of the rejected id in bytes.
        len: usize,
    },
    /// The raw bytes are not valid UTF-8.
    #[error("user id is not valid UTF-8 (invalid byte at offset {offset})")]
    NotUtf8 {
        /// Byte offset of the first invalid byte.
        offset: usize,
    },
    /// The id contains a control or invisible formatting character.
    #[error("user id contains control character U+{code:04X} at byte offset {offset}")]
    ControlChar {
        /// Byte offset of the character.
        offset: usize,
        /// The character's code point.
        code: u32,
    },
}

/// Why a session name was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is the empty string.
    #[error("name is empty")]
    Empty,
    /// The name is longer than [`MAX_NAME_BYTES`].
    #[error("name is {len} bytes long; the limit is {MAX_NAME_BYTES}")]
    TooLong {
        /// Length of the rejected name in bytes.
        len: usize,
    },
    /// The name starts with `.` (hidden files, `.` and `..`).
    #[error("name must not start with '.'")]
    LeadingDot,
    /// The name contains a character outside `[A-Za-z0-9_.-]`.
    #[error("name contains {ch:?} at byte offset {offset}; allowed are A-Z a-z 0-9 _ . -")]
    InvalidChar {
        /// Byte offset of the character.
        offset: usize,
        /// The rejected character.
        ch: char,
    },
}

/// Whether `c` is refused inside a user id.
///
/// Besides `char::is_control` (C0, DEL, C1, which includes NUL), this refuses characters that
/// are invisible or break lines where a user id is shown or logged: the line and paragraph
/// separators U+2028/U+2029 (line breaks in JavaScript and many log viewers), the byte order
/// mark U+FEFF, and the bidirectional controls (U+061C, U+200E, U+200F, U+202A..=U+202E,
/// U+2066..=U+2069) that make one id display as another. Joiners (U+200C/U+200D) stay allowed:
/// emoji sequences need them.
fn is_refused_in_user_id(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}'
                | '\u{2029}'
                | '\u{FEFF}'
                | '\u{061C}'
                | '\u{200E}'
                | '\u{200F}'
                | '\u{202A}'..='\u{202E}'
                | '\u{2066}'..='\u{2069}'
        )
}

/// Checks a user id: 1..=128 bytes of UTF-8 without control characters (see the module docs
/// of the refused set: `char::is_control`, U+2028/U+2029, U+FEFF and the bidi controls).
///
/// Returns the id unchanged on success; no normalisation is applied, so `"User-A"` and
/// `"user-a"` are two users.
pub fn validate_user_id(s: &str) -> Result<&str, UserIdError> {
    if s.is_empty() {
        return Err(UserIdError::Empty);
    }
    if s.len() > MAX_USER_ID_BYTES {
        return Err(UserIdError::TooLong { len: s.len() });
    }
    if let Some((offset, c)) = s.char_indices().find(|&(_, c)| is_refused_in_user_id(c)) {
        return Err(UserIdError::ControlChar {
            offset,
            code: u32::from(c),
        });
    }
    Ok(s)
}

/// Checks a user id given as raw bytes (a header value): as [`validate_user_id`], and the
/// bytes must be valid UTF-8.
pub fn validate_user_id_bytes(b: &[u8]) -> Result<&str, UserIdError> {
    if b.is_empty() {
        return Err(UserIdError::Empty);
    }
    // Length first: no UTF-8 scan of an oversized hostile header.
    if b.len() > MAX_USER_ID_BYTES {
        return Err(UserIdError::TooLong { len: b.len() });
    }
    let s = std::str::from_utf8(b).map_err(|e| UserIdError::NotUtf8 {
        offset: e.valid_up_to(),
    })?;
    validate_user_id(s)
}

/// Whether `s` is used as its own file stem: non-empty and only `[A-Za-z0-9_-]`.
fn is_plain(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A file-name-safe, injective encoding of a user id, for files such as
/// `sessions/<stem>.jsonl` and directories such as `state/<stem>/`.
///
/// An id made only of `[A-Za-z0-9_-]` is its own stem (readable: `user-a`); any other id
/// becomes `~` followed by the base64url (no padding) of its UTF-8 bytes. `~` never occurs in a
/// plain stem, so the two forms never collide. The result never contains `/`, `\`, `.` or NUL
/// and never starts with `.`. For a valid id (at most 128 bytes) it is at most 172 bytes, so
/// even with a suffix it stays under NAME_MAX (255). Any string is accepted (the empty string
/// encodes as `~`), but callers should validate with [`validate_user_id`] first so the length
/// bound holds. The encoding is case-sensitive: it assumes a case-sensitive file system.
pub fn safe_file_stem(user: &str) -> String {
    if is_plain(user) {
        return user.to_owned();
    }
    let mut out = String::with_capacity(1 + user.len().div_ceil(3) * 4);
    out.push(ENCODED_PREFIX);
    URL_SAFE_NO_PAD.encode_string(user.as_bytes(), &mut out);
    out
}

/// The inverse of [`safe_file_stem`]: the user id a stem was made from, or `None` when `stem`
/// is not a stem that [`safe_file_stem`] produces (so listing a directory cannot be fooled by
/// a foreign file name into reporting a user twice).
pub fn user_from_file_stem(stem: &str) -> Option<String> {
    if is_plain(stem) {
        return Some(stem.to_owned());
    }
    let encoded = stem.strip_prefix(ENCODED_PREFIX)?;
    // The default engine config rejects padding and non-zero trailing bits: one canonical form.
    let bytes = URL_SAFE_NO_PAD.decode(encoded).ok()?;
    let user = String::from_utf8(bytes).ok()?;
    // A plain id is never encoded; an encoded plain id is a non-canonical stem.
    if is_plain(&user) {
        return None;
    }
    Some(user)
}

/// Checks a session name (used as `state/<user>/<name>.json`): 1..=64 bytes of
/// `[A-Za-z0-9_.-]`, not starting with `.` (so never `.`, `..` or a hidden file).
pub fn validate_name(s: &str) -> Result<&str, NameError> {
    if s.is_empty() {
        return Err(NameError::Empty);
    }
    if s.len() > MAX_NAME_BYTES {
        return Err(NameError::TooLong { len: s.len() });
    }
    if let Some((offset, ch)) = s
        .char_indices()
        .find(|&(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(NameError::InvalidChar { offset, ch });
    }
    if s.starts_with('.') {
        return Err(NameError::LeadingDot);
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The properties every stem must have, whatever the input.
    fn assert_safe_stem(stem: &str) {
        assert!(!stem.is_empty(), "empty stem");
        assert!(!stem.contains('/'), "{stem:?} contains /");
        assert!(!stem.contains('\\'), "{stem:?} contains \\");
        assert!(!stem.contains('.'), "{stem:?} contains .");
        assert!(!stem.contains('\0'), "{stem:?} contains NUL");
        assert!(!stem.starts_with('.'));
        assert!(stem.is_ascii(), "{stem:?} is not ASCII");
        let p = std::path::Path::new(stem);
        assert_eq!(p.components().count(), 1, "{stem:?} is not one component");
        assert!(matches!(
            p.components().next(),
            Some(std::path::Component::Normal(_))
        ));
    }

    #[test]
    fn valid_user_ids_are_accepted_unchanged() {
        for id in [
            "user-a",
            "a",
            "User A",
            "alice@example.com",
            "用户",
            "👩‍👩‍👧",
            "..",
            "../../etc/passwd",
            "%2e%2e",
            &"x".repeat(MAX_USER_ID_BYTES),
        ] {
            assert_eq!(validate_user_id(id), Ok(id), "{id:?}");
            assert_eq!(validate_user_id_bytes(id.as_bytes()), Ok(id), "{id:?}");
        }
    }

    #[test]
    fn empty_user_id_is_rejected() {
        assert_eq!(validate_user_id(""), Err(UserIdError::Empty));
        assert_eq!(validate_user_id_bytes(b""), Err(UserIdError::Empty));
    }

    #[test]
    fn too_long_user_id_reports_its_length() {
        let long = "x".repeat(MAX_USER_ID_BYTES + 1);
        assert_eq!(
            validate_user_id(&long),
            Err(UserIdError::TooLong { len: 129 })
        );
        assert_eq!(
            validate_user_id_bytes(long.as_bytes()),
            Err(UserIdError::TooLong { len: 129 })
        );
        // The limit is in bytes, not characters: 43 three-byte chars = 129 bytes.
        let wide = "用".repeat(43);
        assert_eq!(
            validate_user_id(&wide),
            Err(UserIdError::TooLong { len: 129 })
        );
        let msg = UserIdError::TooLong { len: 129 }.to_string();
        assert!(msg.contains("129") && msg.contains("128"), "{msg}");
    }

    #[test]
    fn control_characters_are_rejected_with_their_offset() {
        let cases: &[(&str, usize, u32)] = &[
            ("\0", 0, 0),
            ("user\0a", 4, 0),
            ("user\na", 4, 0x0a),
            ("user\r\n", 4, 0x0d),
            ("ab\tc", 2, 0x09),
            ("a\u{7f}", 1, 0x7f),
            ("é\u{85}", 2, 0x85),
            ("a\u{2028}", 1, 0x2028),
            ("a\u{2029}", 1, 0x2029),
            ("\u{FEFF}user", 0, 0xFEFF),
            ("user\u{202E}a", 4, 0x202E),
            ("user\u{2066}a", 4, 0x2066),
            ("user\u{200F}", 4, 0x200F),
        ];
        for &(id, offset, code) in cases {
            assert_eq!(
                validate_user_id(id),
                Err(UserIdError::ControlChar { offset, code }),
                "{id:?}"
            );
        }
        let msg = validate_user_id("user\0a").unwrap_err().to_string();
        assert!(msg.contains("offset 4") && msg.contains("U+0000"), "{msg}");
    }

    #[test]
    fn joiners_stay_allowed() {
        assert!(validate_user_id("a\u{200D}b").is_ok());
        assert!(validate_user_id("a\u{200C}b").is_ok());
    }

    #[test]
    fn non_utf8_bytes_are_rejected() {
        assert_eq!(
            validate_user_id_bytes(b"user\xff"),
            Err(UserIdError::NotUtf8 { offset: 4 })
        );
        // A truncated multi-byte sequence.
        assert_eq!(
            validate_user_id_bytes(b"ab\xe7\x94"),
            Err(UserIdError::NotUtf8 { offset: 2 })
        );
        // Overlong encoding of '/'.
        assert_eq!(
            validate_user_id_bytes(b"\xc0\xaf"),
            Err(UserIdError::NotUtf8 { offset: 0 })
        );
    }

    #[test]
    fn oversized_bytes_are_rejected_before_utf8_check() {
        let mut b = vec![b'x'; 200];
        b[0] = 0xff;
        assert_eq!(
            validate_user_id_bytes(&b),
            Err(UserIdError::TooLong { len: 200 })
        );
    }

    #[test]
    fn plain_ids_are_their_own_stem() {
        for id in ["user-a", "user_1", "ABC", "-", "_", "a-b_c-9"] {
            assert_eq!(safe_file_stem(id), id);
        }
    }

    #[test]
    fn hostile_ids_are_encoded() {
        let hostile = [
            "..",
            ".",
            "/",
            "\\",
            "../etc/passwd",
            "..\\..\\windows",
            "%2e%2e",
            "%2F",
            ".hidden",
            "a.b",
            "user\u{2215}a",
            "user\u{29F8}a",
            "ｕｓｅｒ－ａ",
            "user\0a",
            "~",
            "~dXNlci1h",
            " ",
            "user a",
            "",
        ];
        for id in hostile {
            let stem = safe_file_stem(id);
            assert!(stem.starts_with('~'), "{id:?} -> {stem:?}");
            assert_safe_stem(&stem);
            assert_eq!(user_from_file_stem(&stem).as_deref(), Some(id));
        }
        assert_eq!(safe_file_stem(".."), "~Li4");
        assert_eq!(safe_file_stem("/"), "~Lw");
        assert_eq!(safe_file_stem(""), "~");
    }

    #[test]
    fn look_alikes_do_not_collide_with_the_real_id() {
        let real = safe_file_stem("user-a");
        for fake in ["user\u{2215}a", "ｕｓｅｒ－ａ", "user\u{2010}a", "user-а"] {
            assert_ne!(safe_file_stem(fake), real, "{fake:?}");
        }
    }

    #[test]
    fn longest_ids_stay_under_name_max() {
        // Worst case: 128 bytes that all need encoding.
        for id in [".".repeat(128), "é".repeat(64), "\u{10FFFF}".repeat(32)] {
            assert_eq!(validate_user_id(&id), Ok(id.as_str()));
            let stem = safe_file_stem(&id);
            assert!(stem.len() <= 172, "{}", stem.len());
            assert!(stem.len() + ".jsonl".len() < 255);
            assert_safe_stem(&stem);
        }
        let plain = "a".repeat(128);
        assert_eq!(safe_file_stem(&plain), plain);
    }

    #[test]
    fn foreign_stems_are_not_decoded() {
        // Encoded form of a plain id: not canonical.
        assert_eq!(user_from_file_stem("~dXNlci1h"), None);
        // Not base64url / padding / trailing bits / not UTF-8.
        assert_eq!(user_from_file_stem("~Li4="), None);
        assert_eq!(user_from_file_stem("~Li5"), None);
        assert_eq!(user_from_file_stem("~/w"), None);
        assert_eq!(user_from_file_stem("~_w"), None);
        assert_eq!(user_from_file_stem(".."), None);
        assert_eq!(user_from_file_stem("a.b"), None);
        assert_eq!(user_from_file_stem(""), None);
        assert_eq!(user_from_file_stem("user-a").as_deref(), Some("user-a"));
        assert_eq!(user_from_file_stem("~").as_deref(), Some(""));
    }

    #[test]
    fn good_names_are_accepted() {
        for n in [
            "default",
            "a",
            "my.session-1_x",
            "a..b",
            "A",
            &"n".repeat(64),
        ] {
            assert_eq!(validate_name(n), Ok(n), "{n:?}");
        }
    }

    #[test]
    fn hostile_names_are_rejected() {
        assert_eq!(validate_name(""), Err(NameError::Empty));
        assert_eq!(validate_name("."), Err(NameError::LeadingDot));
        assert_eq!(validate_name(".."), Err(NameError::LeadingDot));
        assert_eq!(validate_name(".hidden"), Err(NameError::LeadingDot));
        assert_eq!(
            validate_name(&"n".repeat(65)),
            Err(NameError::TooLong { len: 65 })
        );
        let bad: &[(&str, usize, char)] = &[
            ("../x", 2, '/'),
            ("a/b", 1, '/'),
            ("a\\b", 1, '\\'),
            ("a\0", 1, '\0'),
            ("a b", 1, ' '),
            ("%2e%2e", 0, '%'),
            ("a\u{2215}b", 1, '\u{2215}'),
            ("ｎａｍｅ", 0, 'ｎ'),
            ("a:b", 1, ':'),
            ("a~", 1, '~'),
            ("name\n", 4, '\n'),
        ];
        for &(n, offset, ch) in bad {
            assert_eq!(
                validate_name(n),
                Err(NameError::InvalidChar { offset, ch }),
                "{n:?}"
            );
        }
    }

    proptest! {
        #[test]
        fn stems_are_injective(a in any::<String>(), b in any::<String>()) {
            prop_assume!(a != b);
            prop_assert_ne!(safe_file_stem(&a), safe_file_stem(&b));
        }

        #[test]
        fn stems_are_injective_on_near_plain_strings(
            a in "[A-Za-z0-9_~.=/-]{0,12}",
            b in "[A-Za-z0-9_~.=/-]{0,12}",
        ) {
            prop_assume!(a != b);
            prop_assert_ne!(safe_file_stem(&a), safe_file_stem(&b));
        }

        #[test]
        fn stems_are_safe_and_decode_back(s in any::<String>()) {
            let stem = safe_file_stem(&s);
            assert_safe_stem(&stem);
            prop_assert_eq!(user_from_file_stem(&stem), Some(s));
        }

        #[test]
        fn decoding_is_only_defined_on_stems(stem in "[A-Za-z0-9_~.=/-]{0,16}") {
            if let Some(user) = user_from_file_stem(&stem) {
                prop_assert_eq!(safe_file_stem(&user), stem);
            }
        }

        #[test]
        fn validated_ids_have_short_stems(s in "\\PC{1,128}") {
            if let Ok(id) = validate_user_id(&s) {
                prop_assert!(safe_file_stem(id).len() <= 172);
            }
        }

        #[test]
        fn validated_names_are_single_normal_components(s in "[A-Za-z0-9_./\\\\-]{0,70}") {
            if let Ok(n) = validate_name(&s) {
                let p = std::path::Path::new(n);
                prop_assert_eq!(p.components().count(), 1);
                prop_assert!(matches!(
                    p.components().next(),
                    Some(std::path::Component::Normal(_))
                ));
            }
        }
    }
}
