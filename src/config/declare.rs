//! The machinery behind the key declaration in `config/mod.rs`: the `config_keys!` macro,
//! the per-key metadata it produces ([`Key`]), flag descriptions ([`Flag`]), where a value
//! came from ([`Source`]), and the small checks the declaration uses.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use super::Config;
use super::kind::Kind;

/// Which subcommands take a key's flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlagGroup {
    /// `moltbot gateway`, `moltbot workers demo` and `moltbot workers info`.
    Pool,
    /// `moltbot gateway` and `moltbot workers demo`.
    Gateway,
}

/// A key's command-line flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flag {
    /// Which subcommands take it.
    pub group: FlagGroup,
    /// The long name, without the dashes.
    pub long: &'static str,
    /// The short name, if any.
    pub short: Option<char>,
    /// The value's placeholder in `--help` when the kind's own (`N`, `DURATION`) says too
    /// little.
    pub value_name: Option<&'static str>,
}

/// A flag of the pool group (see [`FlagGroup::Pool`]).
pub const fn pool(long: &'static str) -> Flag {
    Flag {
        group: FlagGroup::Pool,
        long,
        short: None,
        value_name: None,
    }
}

/// A flag of the gateway group (see [`FlagGroup::Gateway`]).
pub const fn gateway(long: &'static str) -> Flag {
    Flag {
        group: FlagGroup::Gateway,
        ..pool(long)
    }
}

impl Flag {
    /// With a short name.
    pub const fn short(self, c: char) -> Flag {
        Flag {
            short: Some(c),
            ..self
        }
    }

    /// With its own value placeholder.
    pub const fn value_name(self, name: &'static str) -> Flag {
        Flag {
            value_name: Some(name),
            ..self
        }
    }
}

impl fmt::Display for Flag {
    /// `-w, --workers` or `--max-queue`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(c) = self.short {
            write!(f, "-{c}, ")?;
        }
        write!(f, "--{}", self.long)
    }
}

/// What a key's value kind is, for documentation and flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KindInfo {
    /// `"duration"`, `"size"`, ...
    pub name: &'static str,
    /// The flag's value placeholder (`DURATION`).
    pub value_name: &'static str,
    /// A flag without a value that sets `true`.
    pub switch: bool,
    /// The key may be unset.
    pub optional: bool,
}

impl KindInfo {
    /// The information of kind `K` for values of type `T`.
    pub const fn of<K: Kind<T>, T>() -> KindInfo {
        KindInfo {
            name: K::NAME,
            value_name: K::VALUE_NAME,
            switch: K::SWITCH,
            optional: K::OPTIONAL,
        }
    }
}

/// One configuration key: everything the declaration says about it, and the functions the
/// macro generated to read, write and check it on a [`Config`].
#[derive(Debug)]
pub struct Key {
    /// The snake_case name: the TOML key, the field, and `MOLTBOT_<NAME>`.
    pub name: &'static str,
    /// Other names accepted in TOML (the TypeScript names); snake_case ones are accepted as
    /// `MOLTBOT_<ALIAS>` too.
    pub aliases: &'static [&'static str],
    /// The value kind.
    pub kind: KindInfo,
    /// The flag, if the key has one.
    pub flag: Option<Flag>,
    /// A variable read besides `MOLTBOT_<NAME>`, which wins over it.
    pub env_override: Option<&'static str>,
    /// Never serialized nor shown, never a flag.
    pub secret: bool,
    pub(crate) doc: &'static str,
    pub(crate) shown: Option<&'static str>,
    pub(crate) parse: fn(&str) -> Result<(), String>,
    pub(crate) set_str: fn(&mut Config, &str) -> Result<(), String>,
    pub(crate) set_toml: fn(&mut Config, &toml::Value) -> Result<(), String>,
    pub(crate) get_toml: fn(&Config) -> Option<toml::Value>,
    pub(crate) default_toml: fn() -> Option<toml::Value>,
    pub(crate) is_default: fn(&Config) -> bool,
    pub(crate) check: fn(&Config) -> Result<(), String>,
}

impl Key {
    /// The first paragraph of the documentation on one line: the README's "meaning" column,
    /// the flag's help and the comment in `moltbot workers info`.
    pub fn meaning(&self) -> String {
        self.doc
            .lines()
            .map(str::trim)
            .skip_while(|l| l.is_empty())
            .take_while(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// `MOLTBOT_<NAME>`.
    pub fn env_var(&self) -> String {
        format!("{}{}", super::ENV_PREFIX, self.name.to_ascii_uppercase())
    }

    /// Every variable the key is read from, the winning one first.
    pub fn env_vars(&self) -> Vec<String> {
        let mut vars: Vec<String> = self.env_override.map(String::from).into_iter().collect();
        vars.push(self.env_var());
        vars.extend(
            self.snake_aliases()
                .map(|a| format!("{}{}", super::ENV_PREFIX, a.to_ascii_uppercase())),
        );
        vars
    }

    /// Whether `name` (a TOML key) names this key.
    pub fn is_named(&self, name: &str) -> bool {
        self.name == name || self.aliases.contains(&name)
    }

    /// Whether `lower` (the lowercased rest of a `MOLTBOT_*` variable) names this key.
    pub(crate) fn is_env_named(&self, lower: &str) -> bool {
        self.name == lower || self.snake_aliases().any(|a| a == lower)
    }

    fn snake_aliases(&self) -> impl Iterator<Item = &'static str> {
        self.aliases
            .iter()
            .copied()
            .filter(|a| a.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
    }

    /// Checks a string form without storing it (what a flag's value parser does).
    pub fn parse(&self, s: &str) -> Result<(), String> {
        (self.parse)(s)
    }

    /// The default for people: the declared description, else the value as written in TOML,
    /// else `none`.
    pub fn default_text(&self) -> String {
        match self.shown {
            Some(s) => s.to_string(),
            None => (self.default_toml)().map_or_else(|| "none".into(), |v| show(&v)),
        }
    }

    /// The value in `config` as written in TOML, or `None` when unset (and for a secret).
    pub fn value(&self, config: &Config) -> Option<toml::Value> {
        if self.secret {
            None
        } else {
            (self.get_toml)(config)
        }
    }

    /// Whether the key has a value in `config` (an optional key may be unset; an empty list
    /// counts as unset).
    pub fn is_set(&self, config: &Config) -> bool {
        (self.get_toml)(config).is_some()
    }

    /// Whether `config` holds this key's default value.
    pub fn is_default(&self, config: &Config) -> bool {
        (self.is_default)(config)
    }
}

/// A value for people: strings without quotes, the rest as in TOML.
pub fn show(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Where a key's value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Source {
    /// Nobody set it.
    #[default]
    Default,
    /// The config file.
    File,
    /// A `MOLTBOT_*` environment variable.
    Env,
    /// A command-line flag.
    Flag,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::Default => "default",
            Source::File => "config file",
            Source::Env => "environment",
            Source::Flag => "flag",
        })
    }
}

/// Which keys were set by the file, the environment or a flag, and by which (the last layer
/// that set it). It is provenance, not value: it is not serialized, and it never makes two
/// configurations unequal.
#[derive(Debug, Clone, Default)]
pub struct Sources(BTreeMap<&'static str, Source>);

impl Sources {
    /// Where `key`'s value came from.
    pub fn get(&self, key: &str) -> Source {
        self.0.get(key).copied().unwrap_or_default()
    }

    /// Records that `key` was set by `source`.
    pub fn set(&mut self, key: &'static str, source: Source) {
        self.0.insert(key, source);
    }

    /// The keys that were set, with their source, in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, Source)> + '_ {
        self.0.iter().map(|(k, s)| (*k, *s))
    }
}

impl PartialEq for Sources {
    fn eq(&self, _: &Sources) -> bool {
        true
    }
}

/// Applies a declared check to a field; the type annotation lets the check be a closure
/// whose parameter type is inferred.
pub(crate) fn check_with<T>(
    v: &T,
    check: impl FnOnce(&T) -> Result<(), String>,
) -> Result<(), String> {
    check(v)
}

/// A check of an optional key that applies `check` when the key is set.
pub(crate) fn when_set<T>(
    check: fn(&T) -> Result<(), String>,
) -> impl Fn(&Option<T>) -> Result<(), String> {
    move |v| v.as_ref().map_or(Ok(()), check)
}

/// `lo <= v <= hi`.
pub(crate) fn within<T: PartialOrd + fmt::Display>(v: T, lo: T, hi: T) -> Result<(), String> {
    if lo <= v && v <= hi {
        Ok(())
    } else {
        Err(format!("{v} is out of range {lo}..={hi}"))
    }
}

/// `v >= min`.
pub(crate) fn at_least<T: PartialOrd + fmt::Display>(v: T, min: T) -> Result<(), String> {
    if v >= min {
        Ok(())
    } else {
        Err(format!("must be at least {min}"))
    }
}

/// A duration that must not be zero.
pub(crate) fn positive(d: &Duration) -> Result<(), String> {
    if d.is_zero() {
        Err("must be greater than zero".into())
    } else {
        Ok(())
    }
}

/// Declares the configuration keys: each once, with everything the rest is generated from.
///
/// ```text
/// /// Meaning, one paragraph: the README, `--help` and `workers info` show it.
/// ///
/// /// Further paragraphs appear in the field's rustdoc only.
/// name: FieldType as Kind {
///     default: expression,
///     shown: "the default for people",           // optional: when the value says too little
///     aliases: ["camelCaseName"],                // optional: more TOML names
///     env: "MOLTBOT_OTHER_NAME",                 // optional: a variable that wins over MOLTBOT_NAME
///     flag: pool("long-name").short('x'),        // optional: pool(..) or gateway(..)
///     secret: true,                              // optional: never serialized, never a flag
///     check: |v| ...,                            // optional: the key's own validation
/// }
/// ```
///
/// The items of a key come in this order. `Kind` is a unit type of `config::kind` that
/// implements `Kind<FieldType>` (for an `Option<T>` field, `Kind<T>`). Generated: the
/// [`Config`] struct (one pub field per key, plus `sources`), its `Default`, and [`KEYS`].
///
/// [`KEYS`]: super::KEYS
macro_rules! config_keys {
    (
        $(
            $(#[doc = $doc:literal])*
            $name:ident : $ty:ty as $kind:ident {
                default: $default:expr,
                $(shown: $shown:literal,)?
                $(aliases: [$($alias:literal),* $(,)?],)?
                $(env: $env:literal,)?
                $(flag: $flag:expr,)?
                $(secret: $secret:literal,)?
                $(check: $check:expr,)?
            }
        )*
    ) => {
        /// The effective configuration of the gateway and its worker pool: one field per key
        /// of the declaration in `config/mod.rs` (see [`KEYS`] for each key's names, flag and
        /// forms). Build one with `Config { worker_count: 3, ..Config::default() }`.
        #[derive(Debug, Clone, PartialEq)]
        pub struct Config {
            $(
                $(#[doc = $doc])*
                pub $name: $ty,
            )*
            /// Which keys the file, the environment or a flag set (see [`Config::explicit`]).
            /// Not serialized; ignored by `==`.
            pub sources: $crate::config::Sources,
        }

        impl Default for Config {
            fn default() -> Self {
                Config {
                    $( $name: $default, )*
                    sources: $crate::config::Sources::default(),
                }
            }
        }

        /// Every configuration key, in the order of the declaration.
        pub static KEYS: &[$crate::config::Key] = &[
            $(
                $crate::config::Key {
                    name: stringify!($name),
                    aliases: &[$($($alias),*)?],
                    kind: $crate::config::KindInfo::of::<$crate::config::kind::$kind, $ty>(),
                    flag: config_keys!(@some $($flag)?),
                    env_override: config_keys!(@some $($env)?),
                    secret: config_keys!(@yes $($secret)?),
                    doc: concat!($($doc, "\n"),*),
                    shown: config_keys!(@some $($shown)?),
                    parse: |s| {
                        <$crate::config::kind::$kind as $crate::config::kind::Kind<$ty>>::parse(s)
                            .map(drop)
                    },
                    set_str: |c, s| {
                        c.$name =
                            <$crate::config::kind::$kind as $crate::config::kind::Kind<$ty>>::parse(s)?;
                        Ok(())
                    },
                    set_toml: |c, v| {
                        c.$name = <$crate::config::kind::$kind as $crate::config::kind::Kind<$ty>>::from_toml(v)?;
                        Ok(())
                    },
                    get_toml: |c| {
                        <$crate::config::kind::$kind as $crate::config::kind::Kind<$ty>>::to_toml(&c.$name)
                    },
                    default_toml: || {
                        let d: $ty = $default;
                        <$crate::config::kind::$kind as $crate::config::kind::Kind<$ty>>::to_toml(&d)
                    },
                    is_default: |c| {
                        let d: $ty = $default;
                        c.$name == d
                    },
                    check: |c| config_keys!(@check c.$name, $ty $(, $check)?),
                }
            ),*
        ];
    };
    (@some) => { None };
    (@some $e:expr) => { Some($e) };
    (@yes) => { false };
    (@yes $b:literal) => { $b };
    (@check $v:expr, $ty:ty) => {{
        let _ = &$v;
        Ok(())
    }};
    (@check $v:expr, $ty:ty, $check:expr) => {
        $crate::config::declare::check_with::<$ty>(&$v, $check)
    };
}

pub(crate) use config_keys;
