//! Value kinds: the forms a configuration value is written in. Each kind parses its string
//! form with one function, whichever layer the string comes from (a TOML string, a
//! `MOLTBOT_*` variable, a flag); TOML's own integers, floats, booleans and arrays are read
//! by [`Kind::from_toml`] next to it.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration as StdDuration;

use toml::Value;

use super::{GIB, KIB, MIB};

/// How values of type `T` are written: parsed from a string, read from a TOML value, and
/// written back for serialization. Implemented by the unit types of this module (`Count`,
/// `Size`, ...); an `Option<T>` key uses its `T`'s kind, and an empty string unsets it.
pub trait Kind<T> {
    /// The kind's name in documentation (`"duration"`).
    const NAME: &'static str;
    /// The placeholder of a flag's value (`DURATION`).
    const VALUE_NAME: &'static str;
    /// What a value must look like, for error messages.
    const EXPECTED: &'static str;
    /// A flag of this kind takes no value: given, it sets `true`.
    const SWITCH: bool = false;
    /// The key may be unset (an `Option`).
    const OPTIONAL: bool = false;

    /// Parses the string form.
    fn parse(s: &str) -> Result<T, String>;

    /// Reads a TOML value; a string goes through [`Kind::parse`].
    fn from_toml(v: &Value) -> Result<T, String> {
        match v {
            Value::String(s) => Self::parse(s),
            other => Err(wrong_type(Self::EXPECTED, other)),
        }
    }

    /// The value as written to TOML and JSON; `None` leaves the key out (unset).
    fn to_toml(v: &T) -> Option<Value>;
}

impl<K: Kind<T>, T> Kind<Option<T>> for K {
    const NAME: &'static str = K::NAME;
    const VALUE_NAME: &'static str = K::VALUE_NAME;
    const EXPECTED: &'static str = K::EXPECTED;
    const SWITCH: bool = K::SWITCH;
    const OPTIONAL: bool = true;

    /// An empty (or blank) string unsets the key: `MOLTBOT_CORES=` undoes a file's `cores`.
    fn parse(s: &str) -> Result<Option<T>, String> {
        if s.trim().is_empty() {
            Ok(None)
        } else {
            K::parse(s).map(Some)
        }
    }

    fn from_toml(v: &Value) -> Result<Option<T>, String> {
        K::from_toml(v).map(Some)
    }

    fn to_toml(v: &Option<T>) -> Option<Value> {
        v.as_ref().and_then(K::to_toml)
    }
}

fn wrong_type(expected: &str, v: &Value) -> String {
    format!("expected {expected}, got a {}", v.type_str())
}

/// A non-negative integer (`4`).
#[derive(Debug)]
pub struct Count;

macro_rules! count_kind {
    ($($t:ty),*) => {$(
        impl Kind<$t> for Count {
            const NAME: &'static str = "count";
            const VALUE_NAME: &'static str = "N";
            const EXPECTED: &'static str = "a non-negative integer";

            fn parse(s: &str) -> Result<$t, String> {
                let t = s.trim();
                t.parse::<$t>()
                    .map_err(|_| format!("{t:?} is not a valid non-negative integer in range"))
            }

            fn from_toml(v: &Value) -> Result<$t, String> {
                match v {
                    Value::Integer(i) if *i < 0 => Err(format!("{i} must not be negative")),
                    Value::Integer(i) => <$t>::try_from(*i)
                        .map_err(|_| format!("{i} is out of range (at most {})", <$t>::MAX)),
                    Value::String(s) => <Self as Kind<$t>>::parse(s),
                    other => Err(wrong_type(<Self as Kind<$t>>::EXPECTED, other)),
                }
            }

            fn to_toml(v: &$t) -> Option<Value> {
                // TOML integers are i64; a larger count is written as a string.
                Some(i64::try_from(*v).map_or_else(|_| Value::String(v.to_string()), Value::Integer))
            }
        }
    )*};
}

count_kind!(u16, u32, u64, usize);

/// A size in bytes: an integer, or a string with a unit (`"512MiB"`, `"1GB"`).
#[derive(Debug)]
pub struct Size;

macro_rules! size_kind {
    ($($t:ty),*) => {$(
        impl Kind<$t> for Size {
            const NAME: &'static str = "size";
            const VALUE_NAME: &'static str = "SIZE";
            const EXPECTED: &'static str = "a size: integer bytes or a string like \"512MiB\"";

            fn parse(s: &str) -> Result<$t, String> {
                parse_size(s).and_then(|v| {
                    <$t>::try_from(v).map_err(|_| format!("{s:?} is too large for this platform"))
                })
            }

            fn from_toml(v: &Value) -> Result<$t, String> {
                match v {
                    Value::Integer(i) => u64::try_from(*i)
                        .map_err(|_| "a size must not be negative".to_string())
                        .and_then(|b| {
                            <$t>::try_from(b)
                                .map_err(|_| format!("{b} is too large for this platform"))
                        }),
                    Value::String(s) => <Self as Kind<$t>>::parse(s),
                    other => Err(wrong_type(<Self as Kind<$t>>::EXPECTED, other)),
                }
            }

            fn to_toml(v: &$t) -> Option<Value> {
                Some(Value::String(format_size(*v as u64)))
            }
        }
    )*};
}

size_kind!(u64, usize);

/// A duration: integer milliseconds, or a humantime string (`"5s"`, `"250ms"`, `"2m"`).
#[derive(Debug)]
pub struct Duration;

impl Kind<StdDuration> for Duration {
    const NAME: &'static str = "duration";
    const VALUE_NAME: &'static str = "DURATION";
    const EXPECTED: &'static str =
        "a duration: integer milliseconds or a string like \"5s\" or \"250ms\"";

    fn parse(s: &str) -> Result<StdDuration, String> {
        parse_duration(s)
    }

    fn from_toml(v: &Value) -> Result<StdDuration, String> {
        match v {
            Value::Integer(ms) => u64::try_from(*ms)
                .map(StdDuration::from_millis)
                .map_err(|_| "a duration must not be negative".to_string()),
            Value::String(s) => parse_duration(s),
            other => Err(wrong_type(<Self as Kind<StdDuration>>::EXPECTED, other)),
        }
    }

    fn to_toml(v: &StdDuration) -> Option<Value> {
        Some(Value::String(humantime::format_duration(*v).to_string()))
    }
}

/// A number (`1.25`).
#[derive(Debug)]
pub struct Float;

impl Kind<f64> for Float {
    const NAME: &'static str = "number";
    const VALUE_NAME: &'static str = "NUMBER";
    const EXPECTED: &'static str = "a number";

    fn parse(s: &str) -> Result<f64, String> {
        let t = s.trim();
        t.parse::<f64>()
            .map_err(|_| format!("{t:?} is not a number"))
    }

    fn from_toml(v: &Value) -> Result<f64, String> {
        match v {
            Value::Float(f) => Ok(*f),
            Value::Integer(i) => Ok(*i as f64),
            Value::String(s) => <Self as Kind<f64>>::parse(s),
            other => Err(wrong_type(<Self as Kind<f64>>::EXPECTED, other)),
        }
    }

    fn to_toml(v: &f64) -> Option<Value> {
        Some(Value::Float(*v))
    }
}

/// A boolean: `true`/`false`, and in strings also `1`/`0`, `yes`/`no`, `on`/`off`. As a
/// flag, its presence means `true`.
#[derive(Debug)]
pub struct Bool;

impl Kind<bool> for Bool {
    const NAME: &'static str = "bool";
    const VALUE_NAME: &'static str = "BOOL";
    const EXPECTED: &'static str = "a boolean";
    const SWITCH: bool = true;

    fn parse(s: &str) -> Result<bool, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(true),
            "false" | "0" | "no" | "off" => Ok(false),
            other => Err(format!(
                "{other:?} is not a boolean (true/false, 1/0, yes/no, on/off)"
            )),
        }
    }

    fn from_toml(v: &Value) -> Result<bool, String> {
        match v {
            Value::Boolean(b) => Ok(*b),
            Value::String(s) => <Self as Kind<bool>>::parse(s),
            other => Err(wrong_type(<Self as Kind<bool>>::EXPECTED, other)),
        }
    }

    fn to_toml(v: &bool) -> Option<Value> {
        Some(Value::Boolean(*v))
    }
}

/// A file system path (not empty).
#[derive(Debug)]
pub struct Path;

impl Kind<PathBuf> for Path {
    const NAME: &'static str = "path";
    const VALUE_NAME: &'static str = "PATH";
    const EXPECTED: &'static str = "a path (a string)";

    fn parse(s: &str) -> Result<PathBuf, String> {
        if s.is_empty() {
            Err("empty path".into())
        } else {
            Ok(PathBuf::from(s))
        }
    }

    fn to_toml(v: &PathBuf) -> Option<Value> {
        Some(Value::String(v.to_string_lossy().into_owned()))
    }
}

/// A list of paths: a TOML array of strings, or a string with `:` between the paths (as in
/// `PATH`: `MOLTBOT_WORKER_READ_PATHS=/opt/a:/opt/b`). An empty list is left out when written.
#[derive(Debug)]
pub struct PathList;

impl Kind<Vec<PathBuf>> for PathList {
    const NAME: &'static str = "list of paths";
    const VALUE_NAME: &'static str = "PATHS";
    const EXPECTED: &'static str = "a list of paths: an array of strings or \"/a:/b\"";

    fn parse(s: &str) -> Result<Vec<PathBuf>, String> {
        Ok(s.split(':')
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
            .collect())
    }

    fn from_toml(v: &Value) -> Result<Vec<PathBuf>, String> {
        match v {
            Value::Array(items) => strings(items, <Self as Kind<Vec<PathBuf>>>::EXPECTED)
                .map(|v| v.into_iter().map(PathBuf::from).collect()),
            Value::String(s) => <Self as Kind<Vec<PathBuf>>>::parse(s),
            other => Err(wrong_type(<Self as Kind<Vec<PathBuf>>>::EXPECTED, other)),
        }
    }

    fn to_toml(v: &Vec<PathBuf>) -> Option<Value> {
        (!v.is_empty()).then(|| {
            Value::Array(
                v.iter()
                    .map(|p| Value::String(p.to_string_lossy().into_owned()))
                    .collect(),
            )
        })
    }
}

/// A command line: a program and its arguments, as a TOML array of strings or a string that
/// is a JSON array or is split like a POSIX shell would (`python3 "my agent.py"`).
#[derive(Debug)]
pub struct CommandLine;

impl Kind<Vec<String>> for CommandLine {
    const NAME: &'static str = "command line";
    const VALUE_NAME: &'static str = "COMMAND";
    const EXPECTED: &'static str = "a command line: an array of strings or a string";

    fn parse(s: &str) -> Result<Vec<String>, String> {
        parse_command(s)
    }

    fn from_toml(v: &Value) -> Result<Vec<String>, String> {
        match v {
            // An empty array parses; validation names it (`worker_command` must name a program).
            Value::Array(items) => strings(items, <Self as Kind<Vec<String>>>::EXPECTED),
            Value::String(s) => parse_command(s),
            other => Err(wrong_type(<Self as Kind<Vec<String>>>::EXPECTED, other)),
        }
    }

    fn to_toml(v: &Vec<String>) -> Option<Value> {
        Some(Value::Array(v.iter().cloned().map(Value::String).collect()))
    }
}

/// A list of names (environment variable names): a TOML array of strings, or a string with
/// `,` between the names (`MOLTBOT_CELL_ENV=OPENAI_API_KEY,ANTHROPIC_API_KEY`). Blank items are
/// dropped; an empty list is left out when written.
#[derive(Debug)]
pub struct NameList;

impl Kind<Vec<String>> for NameList {
    const NAME: &'static str = "list of names";
    const VALUE_NAME: &'static str = "NAMES";
    const EXPECTED: &'static str = "a list of names: an array of strings or \"A,B\"";

    fn parse(s: &str) -> Result<Vec<String>, String> {
        Ok(s.split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(String::from)
            .collect())
    }

    fn from_toml(v: &Value) -> Result<Vec<String>, String> {
        match v {
            Value::Array(items) => strings(items, <Self as Kind<Vec<String>>>::EXPECTED),
            Value::String(s) => <Self as Kind<Vec<String>>>::parse(s),
            other => Err(wrong_type(<Self as Kind<Vec<String>>>::EXPECTED, other)),
        }
    }

    fn to_toml(v: &Vec<String>) -> Option<Value> {
        (!v.is_empty()).then(|| Value::Array(v.iter().cloned().map(Value::String).collect()))
    }
}

/// What serves the workers' requests: the built-in handlers (or `worker_command`), or one
/// real OpenClaw gateway per slot (a "cell").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CellMode {
    /// No cells.
    #[default]
    None,
    /// `openclaw gateway run`, one per worker, relayed by the worker.
    OpenClaw,
}

/// The cell mode: `none` or `openclaw`.
#[derive(Debug)]
pub struct CellKind;

impl Kind<CellMode> for CellKind {
    const NAME: &'static str = "none | openclaw";
    const VALUE_NAME: &'static str = "none|openclaw";
    const EXPECTED: &'static str = "\"none\" or \"openclaw\"";

    fn parse(s: &str) -> Result<CellMode, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "none" | "" => Ok(CellMode::None),
            "openclaw" => Ok(CellMode::OpenClaw),
            other => Err(format!("{other:?}: expected \"none\" or \"openclaw\"")),
        }
    }

    fn to_toml(v: &CellMode) -> Option<Value> {
        Some(Value::String(
            match v {
                CellMode::None => "none",
                CellMode::OpenClaw => "openclaw",
            }
            .into(),
        ))
    }
}

/// Where worker processes run (`worker_placement`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WorkerPlacement {
    /// Where the workers share the CPUs with the gateway's cores: a light worker beside the
    /// cores, a busy one and the programs workers start on the other CPUs; else anywhere.
    #[default]
    Auto,
    /// Wherever the scheduler puts them.
    Any,
}

/// The worker placement: `auto` or `any`.
#[derive(Debug)]
pub struct PlacementKind;

impl Kind<WorkerPlacement> for PlacementKind {
    const NAME: &'static str = "auto | any";
    const VALUE_NAME: &'static str = "auto|any";
    const EXPECTED: &'static str = "\"auto\" or \"any\"";

    fn parse(s: &str) -> Result<WorkerPlacement, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" | "" => Ok(WorkerPlacement::Auto),
            "any" => Ok(WorkerPlacement::Any),
            other => Err(format!("{other:?}: expected \"auto\" or \"any\"")),
        }
    }

    fn to_toml(v: &WorkerPlacement) -> Option<Value> {
        Some(Value::String(
            match v {
                WorkerPlacement::Auto => "auto",
                WorkerPlacement::Any => "any",
            }
            .into(),
        ))
    }
}

/// An IP address (`127.0.0.1`, `::1`).
#[derive(Debug)]
pub struct Address;

impl Kind<IpAddr> for Address {
    const NAME: &'static str = "IP address";
    const VALUE_NAME: &'static str = "ADDR";
    const EXPECTED: &'static str = "an IP address (a string)";

    fn parse(s: &str) -> Result<IpAddr, String> {
        s.trim()
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address"))
    }

    fn to_toml(v: &IpAddr) -> Option<Value> {
        Some(Value::String(v.to_string()))
    }
}

/// CPU cores: a count (`2`) or a list of core ids (`[0, 1]`, or `"0,1"` as a string).
#[derive(Debug)]
pub struct CoreSet;

impl Kind<Cores> for CoreSet {
    const NAME: &'static str = "cores";
    const VALUE_NAME: &'static str = "N|LIST";
    const EXPECTED: &'static str =
        "a core count (cores = 2) or a list of core ids (cores = [0, 1])";

    fn parse(s: &str) -> Result<Cores, String> {
        s.parse()
    }

    fn from_toml(v: &Value) -> Result<Cores, String> {
        let id =
            |i: &i64| usize::try_from(*i).map_err(|_| format!("core {i}: must not be negative"));
        match v {
            Value::Integer(i) if *i < 0 => Err("core count must not be negative".into()),
            Value::Integer(i) => id(i).map(Cores::Count),
            Value::Array(items) => items
                .iter()
                .map(|item| match item {
                    Value::Integer(i) => id(i),
                    other => Err(wrong_type("a core id (an integer)", other)),
                })
                .collect::<Result<_, _>>()
                .map(Cores::List),
            Value::String(s) => s.parse(),
            other => Err(wrong_type(<Self as Kind<Cores>>::EXPECTED, other)),
        }
    }

    fn to_toml(v: &Cores) -> Option<Value> {
        Some(match v {
            Cores::Count(n) => Value::Integer(*n as i64),
            Cores::List(ids) => {
                Value::Array(ids.iter().map(|i| Value::Integer(*i as i64)).collect())
            }
        })
    }
}

/// Free text (the token).
#[derive(Debug)]
pub struct Text;

impl Kind<String> for Text {
    const NAME: &'static str = "text";
    const VALUE_NAME: &'static str = "TEXT";
    const EXPECTED: &'static str = "a string";

    fn parse(s: &str) -> Result<String, String> {
        Ok(s.to_string())
    }

    fn to_toml(v: &String) -> Option<Value> {
        Some(Value::String(v.clone()))
    }
}

/// The strings of a TOML array.
fn strings(items: &[Value], expected: &str) -> Result<Vec<String>, String> {
    items
        .iter()
        .map(|item| match item {
            Value::String(s) => Ok(s.clone()),
            other => Err(wrong_type(expected, other)),
        })
        .collect()
}

/// Which CPU cores run gateway executors: a count (the first N) or an explicit list of ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cores {
    /// Use this many cores.
    Count(usize),
    /// Use exactly these core ids.
    List(Vec<usize>),
}

impl Cores {
    /// How many executors this selects.
    pub fn count(&self) -> usize {
        match self {
            Cores::Count(n) => *n,
            Cores::List(ids) => ids.len(),
        }
    }
}

impl FromStr for Cores {
    type Err = String;

    /// `"2"` is a count; `"0,1"`, `"[0, 1]"` or `"3,"` is a list.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let bracketed = t.starts_with('[') && t.ends_with(']') && t.len() >= 2;
        if !bracketed && !t.contains(',') {
            return t.parse::<usize>().map(Cores::Count).map_err(|_| {
                format!("expected a core count like 2 or a list like 0,1; got {t:?}")
            });
        }
        let inner = if bracketed { &t[1..t.len() - 1] } else { t };
        let mut ids = Vec::new();
        for part in inner.split(',') {
            let p = part.trim();
            if p.is_empty() {
                continue;
            }
            ids.push(
                p.parse::<usize>()
                    .map_err(|_| format!("{p:?} is not a core id (a non-negative integer)"))?,
            );
        }
        Ok(Cores::List(ids))
    }
}

impl fmt::Display for Cores {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cores::Count(n) => write!(f, "{n}"),
            Cores::List(ids) => {
                let parts: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
                write!(f, "[{}]", parts.join(", "))
            }
        }
    }
}

/// Parses a duration: an integer is milliseconds, anything else a humantime string (`"5s"`,
/// `"250ms"`, `"1h 30m"`).
pub fn parse_duration(s: &str) -> Result<StdDuration, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty duration; expected milliseconds or e.g. \"5s\"".into());
    }
    if t.bytes().all(|b| b.is_ascii_digit()) {
        return t
            .parse::<u64>()
            .map(StdDuration::from_millis)
            .map_err(|_| format!("{t:?} is too large a number of milliseconds"));
    }
    humantime::parse_duration(t).map_err(|e| {
        format!("{t:?} is not a duration ({e}); expected milliseconds or e.g. \"5s\", \"250ms\"")
    })
}

/// Parses a size: an integer of bytes, optionally with a unit (`"512MiB"`, `"64 KiB"`,
/// `"1.5GiB"`, `"512MB"` = 512 × 10^6). A fraction must come out as whole bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim();
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "ki" | "kib" => KIB,
        "m" | "mi" | "mib" => MIB,
        "g" | "gi" | "gib" => GIB,
        "t" | "ti" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => {
            return Err(format!(
                "{t:?} is not a size: unknown unit {unit:?} (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"
            ));
        }
    };
    let (int, frac) = match num.split_once('.') {
        Some((i, f)) => (i, f),
        None => (num, ""),
    };
    if (int.is_empty() && frac.is_empty())
        || frac.contains('.')
        || (num.contains('.') && frac.is_empty())
    {
        return Err(format!(
            "{t:?} is not a size; expected e.g. 1048576, \"512MiB\" or \"1.5GiB\""
        ));
    }
    if frac.len() > 18 {
        return Err(format!("{t:?}: too many decimal places"));
    }
    let too_large = || format!("{t:?} is too large a size");
    let int_v: u128 = if int.is_empty() {
        0
    } else {
        int.parse::<u128>().map_err(|_| too_large())?
    };
    let mut total = int_v.checked_mul(u128::from(mult)).ok_or_else(too_large)?;
    if !frac.is_empty() {
        let scale = 10u128.pow(frac.len() as u32);
        let frac_v = frac.parse::<u128>().map_err(|_| too_large())? * u128::from(mult);
        if frac_v % scale != 0 {
            return Err(format!("{t:?} is not a whole number of bytes"));
        }
        total = total.checked_add(frac_v / scale).ok_or_else(too_large)?;
    }
    u64::try_from(total).map_err(|_| too_large())
}

/// Formats a size for display and serialization: the largest binary unit that divides it
/// exactly (`"512MiB"`), else plain bytes (`"1000B"`). [`parse_size`] reads it back.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(u64, &str); 4] = [(1 << 40, "TiB"), (GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")];
    for (m, name) in UNITS {
        if bytes >= m && bytes.is_multiple_of(m) {
            return format!("{}{name}", bytes / m);
        }
    }
    format!("{bytes}B")
}

/// A command line: a JSON array (`["python3", "agent.py"]`) or a string split like a POSIX
/// shell would (`python3 "my agent.py"`).
pub fn parse_command(s: &str) -> Result<Vec<String>, String> {
    let t = s.trim();
    let argv: Vec<String> = if t.starts_with('[') {
        serde_json::from_str(t).map_err(|e| format!("{s:?} is not a JSON array of strings: {e}"))?
    } else {
        shlex::split(t).ok_or_else(|| format!("{s:?} has unbalanced quotes"))?
    };
    if argv.is_empty() || argv[0].is_empty() {
        return Err("the command must name a program".into());
    }
    Ok(argv)
}
