//! Replacing a file whole or not at all.

use std::ffi::OsString;
use std::fs::Permissions;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// How [`write_atomic`] creates and finishes the file; each caller decides its own durability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteOptions {
    /// The mode the file is created with (the process umask applies, as for `open(2)`).
    pub mode: u32,
    /// fsync the file before the rename: after a machine crash the path holds the new bytes
    /// or the old file, never an empty or partial one. Without it the rename still keeps
    /// every reader from seeing a partial file while the machine runs.
    pub sync: bool,
}

/// Writes `bytes` to `path` through a new temporary file in the same directory, renamed over
/// `path`: a reader sees the old file or the new one, never a mix.
///
/// The temporary file is `.<name>.XXXXXX.tmp` (a dot file, which listings of the directory can
/// skip), created exclusively (never an existing file or a planted link), and removed on any
/// failure. The directory itself is not synced.
pub fn write_atomic(path: &Path, bytes: &[u8], opts: WriteOptions) -> io::Result<()> {
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} has no file name", path.display()),
        )
    })?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let mut prefix = OsString::from(".");
    prefix.push(name);
    prefix.push(".");
    let mut tmp = tempfile::Builder::new()
        .prefix(&prefix)
        .suffix(".tmp")
        .permissions(Permissions::from_mode(opts.mode))
        .tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    if opts.sync {
        tmp.as_file().sync_all()?;
    }
    // On failure the temporary file is dropped with the error, which removes it.
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::MetadataExt;

    use super::*;

    const PRIVATE: WriteOptions = WriteOptions {
        mode: 0o600,
        sync: false,
    };

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn creates_and_replaces_with_the_mode_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.json");
        write_atomic(&path, b"one", PRIVATE).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"one");
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        write_atomic(
            &path,
            b"two",
            WriteOptions {
                mode: 0o600,
                sync: true,
            },
        )
        .unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(entries(dir.path()), ["a.json"]);
    }

    #[test]
    fn a_failed_rename_keeps_the_old_file_and_removes_the_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        // A directory in the way: the rename fails.
        let path = dir.path().join("taken");
        fs::create_dir(&path).unwrap();
        fs::write(path.join("inside"), "kept").unwrap();
        assert!(write_atomic(&path, b"new", PRIVATE).is_err());
        assert_eq!(entries(dir.path()), ["taken"]);
        assert_eq!(fs::read(path.join("inside")).unwrap(), b"kept");
    }

    #[test]
    fn a_link_at_the_path_is_replaced_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        fs::write(&target, "untouched").unwrap();
        let path = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &path).unwrap();
        write_atomic(&path, b"new", PRIVATE).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"untouched");
        assert!(fs::symlink_metadata(&path).unwrap().is_file());
        assert_eq!(fs::read(&path).unwrap(), b"new");
    }

    #[test]
    fn a_path_without_a_file_name_is_refused() {
        let err = write_atomic(Path::new("/"), b"x", PRIVATE).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
