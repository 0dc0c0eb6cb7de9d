//! cgroup v2 directories: the scope an accelerator applies to.

use std::fs;
use std::io::{self, ErrorKind};
use std::path::{Path, PathBuf};

use nix::sys::statfs::{statfs, CGROUP2_SUPER_MAGIC};

use crate::error::{Error, Result};

/// A directory of the cgroup v2 hierarchy. Sockets created by processes in
/// it (or in its descendants) are in the accelerator's scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// A cgroup v2 directory given by path.
    ///
    /// # Errors
    /// [`Error::CgroupNotFound`] if it does not exist, [`Error::NotCgroupV2`]
    /// if it is not a directory of a cgroup2 filesystem.
    pub fn path(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let mount = || mount_description();
        let meta = match fs::metadata(path) {
            Ok(meta) => meta,
            Err(err) if err.kind() == ErrorKind::NotFound => {
                return Err(Error::CgroupNotFound {
                    path: path.to_owned(),
                    mount: mount(),
                })
            }
            Err(err) => return Err(Error::io("stat", path, err)),
        };
        if !meta.is_dir() {
            return Err(Error::NotCgroupV2 {
                path: path.to_owned(),
                detail: "not a directory".into(),
                mount: mount(),
            });
        }
        let fs = statfs(path).map_err(|errno| Error::io("statfs", path, errno.into()))?;
        if fs.filesystem_type() != CGROUP2_SUPER_MAGIC {
            return Err(Error::NotCgroupV2 {
                path: path.to_owned(),
                detail: format!("filesystem magic {:#x}", fs.filesystem_type().0),
                mount: mount(),
            });
        }
        Ok(Cgroup {
            path: path.to_owned(),
        })
    }

    /// The root of the cgroup v2 hierarchy: every process on the host.
    ///
    /// # Errors
    /// [`Error::Cgroup2NotMounted`] if no cgroup2 filesystem is mounted.
    pub fn root() -> Result<Self> {
        Cgroup::path(cgroup2_mount()?)
    }

    /// The cgroup v2 directory of the calling process (from /proc/self/cgroup).
    ///
    /// # Errors
    /// [`Error::Cgroup2NotMounted`], or an I/O error reading /proc.
    pub fn current() -> Result<Self> {
        let mount = cgroup2_mount()?;
        let text = fs::read_to_string("/proc/self/cgroup")
            .map_err(|err| Error::io("read", "/proc/self/cgroup", err))?;
        let relative = text
            .lines()
            .find_map(|line| line.strip_prefix("0::"))
            .ok_or_else(|| {
                Error::io(
                    "parse",
                    "/proc/self/cgroup",
                    io::Error::other("no cgroup v2 (\"0::\") line"),
                )
            })?;
        Cgroup::path(mount.join(relative.trim_start_matches('/')))
    }

    /// The directory.
    pub fn as_path(&self) -> &Path {
        &self.path
    }

    /// Whether this is the root of the hierarchy.
    pub fn is_root(&self) -> bool {
        cgroup2_mount().is_ok_and(|mount| same_dir(&mount, &self.path))
    }

    /// Creates the child cgroup `name` below this one; it is removed again
    /// when the returned guard is dropped.
    ///
    /// Needs write access to this directory (root, or a delegated subtree).
    ///
    /// # Errors
    /// An I/O error from mkdir, e.g. `AlreadyExists` if the name is taken.
    pub fn create_child(&self, name: &str) -> Result<ChildCgroup> {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(Error::io(
                "mkdir",
                self.path.join(name),
                io::Error::new(
                    ErrorKind::InvalidInput,
                    "child cgroup names are one plain path component",
                ),
            ));
        }
        let path = self.path.join(name);
        fs::create_dir(&path).map_err(|err| Error::io("mkdir", &path, err))?;
        Ok(ChildCgroup {
            cgroup: Cgroup { path },
            parent: self.clone(),
        })
    }

    /// Moves process `pid` (all its threads) into this cgroup.
    ///
    /// # Errors
    /// An I/O error writing `cgroup.procs`.
    pub fn add_process(&self, pid: u32) -> Result<()> {
        let procs = self.path.join("cgroup.procs");
        fs::write(&procs, pid.to_string()).map_err(|err| Error::io("write", &procs, err))
    }

    /// The processes in this cgroup (not its descendants).
    ///
    /// # Errors
    /// An I/O error reading `cgroup.procs`.
    pub fn processes(&self) -> Result<Vec<u32>> {
        let procs = self.path.join("cgroup.procs");
        let text = fs::read_to_string(&procs).map_err(|err| Error::io("read", &procs, err))?;
        Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }
}

/// A cgroup this process created. Dropping it moves any processes still
/// inside back to the parent and removes the directory, ignoring errors;
/// [`ChildCgroup::remove`] returns them.
#[derive(Debug)]
#[must_use = "dropping the guard removes the cgroup at once"]
pub struct ChildCgroup {
    cgroup: Cgroup,
    parent: Cgroup,
}

impl ChildCgroup {
    /// The cgroup itself.
    pub fn cgroup(&self) -> &Cgroup {
        &self.cgroup
    }

    /// Removes the cgroup now, reporting errors.
    ///
    /// # Errors
    /// An I/O error if a process could not be moved out or rmdir failed.
    pub fn remove(mut self) -> Result<()> {
        let result = self.remove_inner();
        // Already removed (or the error reported): skip the Drop attempt.
        self.cgroup.path = PathBuf::new();
        result
    }

    fn remove_inner(&self) -> Result<()> {
        for pid in self.cgroup.processes()? {
            match self.parent.add_process(pid) {
                // The process exited in between: nothing to move.
                Err(Error::Io { source, .. }) if source.raw_os_error() == Some(libc_esrch()) => {}
                other => other?,
            }
        }
        // rmdir can briefly fail with EBUSY while the last exiting process
        // is still being released.
        let mut last = None;
        for _ in 0..50 {
            match fs::remove_dir(&self.cgroup.path) {
                Ok(()) => return Ok(()),
                Err(err) if err.kind() == ErrorKind::NotFound => return Ok(()),
                Err(err) => last = Some(err),
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Err(Error::io(
            "rmdir",
            &self.cgroup.path,
            last.unwrap_or_else(|| io::Error::other("rmdir did not succeed")),
        ))
    }
}

impl std::ops::Deref for ChildCgroup {
    type Target = Cgroup;
    fn deref(&self) -> &Cgroup {
        &self.cgroup
    }
}

impl Drop for ChildCgroup {
    fn drop(&mut self) {
        if !self.cgroup.path.as_os_str().is_empty() {
            let _ = self.remove_inner();
        }
    }
}

fn libc_esrch() -> i32 {
    nix::errno::Errno::ESRCH as i32
}

/// Where the cgroup v2 filesystem is mounted, from /proc/self/mountinfo.
///
/// # Errors
/// [`Error::Cgroup2NotMounted`] if none is.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|err| Error::io("read", "/proc/self/mountinfo", err))?;
    parse_cgroup2_mount(&text).ok_or(Error::Cgroup2NotMounted)
}

/// mountinfo lines: `id parent maj:min root mountpoint opts [optional...] - fstype source superopts`.
fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        let fstype = after.split_whitespace().next()?;
        let mount_point = before.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_mountinfo(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal `\NNN`.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .and_then(|d| std::str::from_utf8(d).ok());
        match (bytes[i], octal.and_then(|d| u8::from_str_radix(d, 8).ok())) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn mount_description() -> String {
    cgroup2_mount()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "(none mounted)".into())
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (fs::canonicalize(a), fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_mountinfo() {
        let text = "\
25 30 0:22 / /sys/fs/cgroup rw,nosuid - tmpfs tmpfs ro,mode=755
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
42 25 0:39 / /sys/fs/cgroup/cpu rw shared:9 - cgroup cgroup rw,cpu";
        assert_eq!(
            parse_cgroup2_mount(text),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn unescapes_mount_points_and_reports_absence() {
        let text = r"41 31 0:38 / /mnt/my\040cgroup rw shared:1 - cgroup2 none rw";
        assert_eq!(
            parse_cgroup2_mount(text),
            Some(PathBuf::from("/mnt/my cgroup"))
        );
        assert_eq!(
            parse_cgroup2_mount("1 2 0:1 / / rw - ext4 /dev/vda rw"),
            None
        );
    }

    #[test]
    fn rejects_paths_that_are_not_cgroup2() {
        let err = Cgroup::path("/definitely/not/here").unwrap_err();
        assert!(matches!(err, Error::CgroupNotFound { .. }), "{err}");
        assert!(err.to_string().contains("/definitely/not/here"));
        let err = Cgroup::path("/proc").unwrap_err();
        assert!(matches!(err, Error::NotCgroupV2 { .. }), "{err}");
        assert!(
            err.to_string().contains("not a cgroup v2 directory"),
            "{err}"
        );
    }
}
