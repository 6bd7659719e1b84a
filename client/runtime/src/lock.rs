//! The exclusive lock on a data dir.

use std::path::Path;

/// An exclusive lock on a data dir (`LOCK` in it, holding the owner's pid), released
/// when dropped or when the process exits. Two processes on one data dir would corrupt
/// it; the second gets a clear error instead.
#[derive(Debug)]
pub struct DirLock {
    _file: std::fs::File,
}

/// Takes the data dir's lock.
///
/// # Errors
/// Another process holds it (the message names its pid and what to do), or the dir
/// cannot be created.
pub fn lock_dir(dir: &Path) -> Result<DirLock, String> {
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsRawFd;
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let path = dir.join("LOCK");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| format!("opening {}: {e}", path.display()))?;
    // SAFETY: flock on a descriptor we own; no memory is shared.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let mut pid = String::new();
        let _ = file.read_to_string(&mut pid);
        return Err(format!(
            "{} is in use by another process (pid {}); stop it, or pass another --data-dir",
            dir.display(),
            pid.trim()
        ));
    }
    let _ = file.set_len(0);
    let _ = file.rewind();
    let _ = write!(file, "{}", std::process::id());
    Ok(DirLock { _file: file })
}
