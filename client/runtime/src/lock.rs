//! The exclusive lock on a data dir.

use std::path::{Path, PathBuf};

/// An exclusive lock on a data dir (`LOCK` in it, holding the owner's pid), released
/// when dropped or when the process exits. Two processes on one data dir would corrupt
/// it; the second gets a clear error instead.
#[derive(Debug)]
pub struct DirLock {
    _file: std::fs::File,
}

/// Why a data dir could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds the lock; the message names its pid and what to do.
    #[error("{} is in use by another process (pid {pid}); stop it, or pass another --data-dir", .dir.display())]
    InUse { dir: PathBuf, pid: String },
    #[error("{what} {}: {source}", .path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Takes the data dir's lock.
///
/// # Errors
/// Another process holds it (the message names its pid and what to do), or the dir
/// cannot be created.
pub fn lock_dir(dir: &Path) -> Result<DirLock, LockError> {
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsRawFd;
    let io = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| LockError::Io { what, path, source }
    };
    std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
    let path = dir.join("LOCK");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io("opening", &path))?;
    // SAFETY: flock on a descriptor we own; no memory is shared.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let mut pid = String::new();
        let _ = file.read_to_string(&mut pid);
        return Err(LockError::InUse {
            dir: dir.to_path_buf(),
            pid: pid.trim().to_string(),
        });
    }
    let _ = file.set_len(0);
    let _ = file.rewind();
    let _ = write!(file, "{}", std::process::id());
    Ok(DirLock { _file: file })
}
