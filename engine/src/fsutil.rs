//! Output stage, every writer: the one atomic file write. A durable file (checkpoint, config,
//! picture, report, cache) is written to a temp file in its own folder, fsynced, renamed over the
//! target and the folder fsynced, so a reader or a crash never sees half a file.
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};

/// The temp name of `path`: hidden, in the same folder (so the rename stays on one file system),
/// unique per process and call (two threads may write the same target).
fn temp_path(path: &Path) -> Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .with_context(|| format!("{}: not a file path", path.display()))?
        .to_string_lossy();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    Ok(path.with_file_name(format!(".{name}.{}.{n}.tmp", std::process::id())))
}

/// Writes `path` atomically through a writer that takes a path (safetensors, image encoders):
/// `write` creates the temp file, which is then fsynced, renamed over `path`, and the folder
/// fsynced. The folder must exist (see [`ensure_parent`]). On any error the temp file is removed,
/// an existing `path` is left as it was, and the error names `path`.
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = temp_path(path)?;
    let result = (|| -> Result<()> {
        write(&tmp)?;
        set_default_mode(&tmp)?;
        fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .context("fsync of the temp file")?;
        fs::rename(&tmp, path).with_context(|| format!("renaming {}", tmp.display()))?;
        sync_dir(path.parent());
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing {}", path.display()))
}

/// Gives `path` the permissions a plain `File::create` would (0666 minus the umask): writers
/// that go through their own temp file (safetensors' `NamedTempFile`) leave 0600, and a run
/// folder's checkpoints would then be the only files other users cannot read.
fn set_default_mode(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = 0o666 & !process_umask();
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .with_context(|| format!("setting the permissions of {}", path.display()))?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// The process umask, read once from `/proc/self/status` (Linux); 0o022 where it cannot be read.
#[cfg(unix)]
fn process_umask() -> u32 {
    static UMASK: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *UMASK.get_or_init(|| {
        fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Umask:"))
                    .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
            })
            .unwrap_or(0o022)
    })
}

/// Writes `bytes` to `path` atomically (see [`write_atomic_with`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |tmp| {
        let mut f = fs::File::create(tmp)?;
        f.write_all(bytes)?;
        Ok(())
    })
}

/// Builds the folder `dir` whole: `fill` writes into a fresh hidden temp folder beside it, which
/// is then renamed to `dir`, so a reader or a crash never sees half a folder (a generated
/// dataset). On error the temp folder is removed. Temp folders left by killed runs (their process
/// gone) are removed first. Returns false, with nothing changed, when `dir` already exists (or
/// another process finished it first). Files inside are not fsynced one by one; the rename and the
/// parent folder are.
pub fn create_dir_atomic(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<bool> {
    if dir.exists() {
        return Ok(false);
    }
    let tmp = temp_path(dir)?;
    remove_stale_temps(dir);
    let result = (|| -> Result<bool> {
        ensure_parent(&tmp)?;
        fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        fill(&tmp)?;
        match fs::rename(&tmp, dir) {
            Ok(()) => {
                sync_dir(dir.parent());
                Ok(true)
            }
            // Another process renamed its copy first: keep that one.
            Err(_) if dir.is_dir() => {
                let _ = fs::remove_dir_all(&tmp);
                Ok(false)
            }
            Err(e) => Err(e).with_context(|| format!("renaming {}", tmp.display())),
        }
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result.with_context(|| format!("building {}", dir.display()))
}

/// Removes the temp folders of `dir` ([`temp_path`] names) whose process no longer runs.
fn remove_stale_temps(dir: &Path) {
    let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) else {
        return;
    };
    let prefix = format!(".{}.", name.to_string_lossy());
    let Ok(entries) = fs::read_dir(if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    }) else {
        return;
    };
    for e in entries.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = n.strip_prefix(&prefix).and_then(|r| r.strip_suffix(".tmp")) else {
            continue;
        };
        let pid = rest.split('.').next().unwrap_or("");
        let alive = pid
            .parse::<u32>()
            .is_ok_and(|p| p == std::process::id() || Path::new("/proc").join(pid).exists());
        if !alive && e.path().is_dir() {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

/// Creates the folder `path` lives in (and its parents), naming it on error.
pub fn ensure_parent(path: &Path) -> Result<()> {
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display())),
        None => Ok(()),
    }
}

/// Persists a rename in `dir` (best effort: not every platform can open a folder for fsync).
fn sync_dir(dir: Option<&Path>) {
    let dir = match dir {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// The sorted names in `dir` (tests of the writers).
#[cfg(test)]
pub(crate) fn dir_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::dir_names as names;
    use super::*;
    use anyhow::bail;

    #[test]
    fn the_content_appears_whole_and_replaces_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.json");
        write_atomic(&p, b"old").unwrap();
        let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        write_atomic(&p, &big).unwrap();
        assert_eq!(fs::read(&p).unwrap(), big);
        assert_eq!(names(dir.path()), ["a.json"]);
        write_atomic_with(&dir.path().join("b.bin"), |tmp| {
            fs::write(tmp, b"via a path")?;
            Ok(())
        })
        .unwrap();
        assert_eq!(fs::read(dir.path().join("b.bin")).unwrap(), b"via a path");
        assert_eq!(names(dir.path()), ["a.json", "b.bin"]);
    }

    #[test]
    fn a_folder_appears_whole_or_not_at_all() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("set");
        // A temp folder of a killed run (pid 0 never runs a user process) is cleaned up.
        fs::create_dir(root.path().join(".set.0.3.tmp")).unwrap();
        let err = create_dir_atomic(&dir, |tmp| {
            fs::write(tmp.join("a.json"), b"half")?;
            bail!("killed (injected)")
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains("injected"));
        assert!(names(root.path()).is_empty(), "{:?}", names(root.path()));
        assert!(create_dir_atomic(&dir, |tmp| Ok(fs::write(tmp.join("a.json"), b"x")?)).unwrap());
        assert_eq!(names(root.path()), ["set"]);
        assert_eq!(fs::read(dir.join("a.json")).unwrap(), b"x");
        // An existing folder is left alone.
        assert!(!create_dir_atomic(&dir, |_| bail!("not called")).unwrap());
    }

    #[test]
    fn a_failing_writer_leaves_no_partial_target_no_temp_file_and_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("new.safetensors");
        let err = write_atomic_with(&p, |tmp| {
            fs::write(tmp, b"half")?;
            bail!("disk full (injected)")
        })
        .unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("injected") && msg.contains(&p.display().to_string()),
            "{msg}"
        );
        assert!(names(dir.path()).is_empty(), "{:?}", names(dir.path()));
        // an existing target keeps its content
        let q = dir.path().join("old.json");
        write_atomic(&q, b"old").unwrap();
        assert!(write_atomic_with(&q, |_| bail!("no")).is_err());
        assert_eq!(fs::read(&q).unwrap(), b"old");
        assert_eq!(names(dir.path()), ["old.json"]);
        // a target in a folder that does not exist fails without creating anything
        let missing = dir.path().join("nope").join("b.json");
        let err = format!("{:#}", write_atomic(&missing, b"x").unwrap_err());
        assert!(err.contains("nope/b.json"), "{err}");
        assert!(!dir.path().join("nope").exists());
        ensure_parent(&missing).unwrap();
        write_atomic(&missing, b"x").unwrap();
        assert_eq!(fs::read(&missing).unwrap(), b"x");
    }

    #[cfg(unix)]
    #[test]
    fn files_from_writers_with_private_temp_files_get_the_usual_permissions() {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain");
        fs::File::create(&plain).unwrap();
        let want = fs::metadata(&plain).unwrap().permissions().mode() & 0o777;
        // safetensors writes through a 0600 NamedTempFile renamed over our temp path
        let target = dir.path().join("w.safetensors");
        write_atomic_with(&target, |tmp| {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(tmp)?;
            f.write_all(b"x")?;
            Ok(())
        })
        .unwrap();
        let got = fs::metadata(&target).unwrap().permissions().mode() & 0o777;
        assert_eq!(got, want, "{got:o} != {want:o}");
        assert_eq!(want, 0o666 & !process_umask());
    }
}
