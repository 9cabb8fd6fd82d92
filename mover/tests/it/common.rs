//! Helpers every test module shares: a repository environment that runs the real `mover`
//! binary, deterministic volume contents, hashing, loop devices.

pub use std::io::{Read, Write};
pub use std::os::unix::fs::FileExt;
pub use std::path::{Path, PathBuf};
pub use std::process::{Command, Output};

pub struct Env {
    pub dir: tempfile::TempDir,
    pub repo: String,
    pub extra: Vec<String>,
}

impl Env {
    pub fn new() -> Self {
        let e = Self::new_uninit();
        e.ok(&["init"]);
        e
    }
    /// A local repository path, not initialised yet.
    pub fn new_uninit() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("repo").display().to_string();
        Env { dir, repo, extra: vec![] }
    }
    pub fn s3(prefix: &str) -> Self {
        let (endpoint, bucket) = s3_env();
        let dir = tempfile::tempdir().unwrap();
        let repo = format!("s3://{bucket}/{prefix}-{}", rand_suffix());
        let e = Env { dir, repo, extra: vec!["--s3-endpoint".into(), endpoint] };
        e.ok(&["init"]);
        e
    }
    /// The names of every object of this S3 repository, sorted (read with the test
    /// server's admin credentials, not through Mover).
    pub fn s3_objects(&self) -> Vec<String> {
        let (endpoint, bucket) = s3_env();
        assert!(self.repo.starts_with(&format!("s3://{bucket}/")), "not an S3 repository: {}", self.repo);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let mut o = mover_backends::S3Options::from_url(&self.repo).unwrap();
            o.endpoint = Some(endpoint);
            let s = mover_backends::S3Storage::new(o).await;
            let c = tokio_util::sync::CancellationToken::new();
            let mut v: Vec<String> = mover_format::storage::list_all(&s, "", &c).await.unwrap().into_iter().map(|m| m.name).collect();
            v.sort();
            v
        })
    }
    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }
    pub fn cmd(&self, args: &[&str]) -> Command {
        self.cmd_in(&[], args)
    }
    /// `mover ARGS` run through `wrapper` (e.g. `unshare --pid --fork`), with this
    /// environment.
    pub fn cmd_in(&self, wrapper: &[&str], args: &[&str]) -> Command {
        let mut c = match wrapper.split_first() {
            Some((w, rest)) => {
                let mut c = Command::new(w);
                c.args(rest).arg(env!("CARGO_BIN_EXE_mover"));
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_mover")),
        };
        c.args(args)
            .args(&self.extra)
            .env("MOVER_REPOSITORY", &self.repo)
            .env("MOVER_PASSWORD", "test-password")
            .env("MOVER_CACHE_DIR", self.dir.path().join("cache"))
            .env("MOVER_INSECURE_TEST_KDF", "1")
            .env_remove("MOVER_LOG");
        c
    }
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(o.status.success(), "mover {args:?} failed:\n{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        serde_json::from_str(&self.ok(&a)).unwrap()
    }
    /// Runs a command that must fail; returns its stderr.
    pub fn fail(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(!o.status.success(), "mover {args:?} should have failed");
        assert_eq!(o.status.code(), Some(1));
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(err.starts_with("error: "), "first line names the error: {err}");
        err
    }
    pub fn snapshot_count(&self) -> usize {
        self.json(&["snapshots"]).as_array().unwrap().len()
    }
}

/// Flips one byte in the middle of the largest pack of a local repository (a data pack);
/// returns its path.
pub fn flip_byte_in_largest_pack(repo: &Path) -> PathBuf {
    flip_bytes_in_largest_of(&pack_files(repo), &[0.5])
}

/// The pack files of a local repository.
pub fn pack_files(repo: &Path) -> Vec<PathBuf> {
    let mut packs = Vec::new();
    for d in std::fs::read_dir(repo.join("packs")).unwrap() {
        for f in std::fs::read_dir(d.unwrap().path()).unwrap() {
            packs.push(f.unwrap().path());
        }
    }
    packs
}

/// Flips one byte at each fraction `at` of the largest of `packs`; returns its path.
pub fn flip_bytes_in_largest_of(packs: &[PathBuf], at: &[f64]) -> PathBuf {
    let mut sized: Vec<(u64, PathBuf)> = packs.iter().map(|p| (std::fs::metadata(p).unwrap().len(), p.clone())).collect();
    sized.sort();
    let (len, big) = sized.last().unwrap().clone();
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&big).unwrap();
    for frac in at {
        let off = (len as f64 * frac) as u64;
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, off).unwrap();
        f.write_all_at(&[b[0] ^ 0x40], off).unwrap();
    }
    big
}

/// Waits until `index_dir` holds `n` index segments (checkpoints) while `child` still runs,
/// then kills it with SIGKILL. `what` names the child in failures.
pub fn kill_after_checkpoints(child: &mut std::process::Child, index_dir: &Path, n: usize, what: &str) {
    let t0 = std::time::Instant::now();
    loop {
        if std::fs::read_dir(index_dir).map(|d| d.count()).unwrap_or(0) >= n {
            break;
        }
        assert!(t0.elapsed().as_secs() < 120, "no checkpoints appeared");
        assert!(child.try_wait().unwrap().is_none(), "{what} finished before it could be killed; make the volume larger");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
}

pub fn rand_suffix() -> String {
    format!("{:x}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos())
}

pub fn s3_env() -> (String, String) {
    let endpoint = std::env::var("MOVER_TEST_S3_ENDPOINT")
        .expect("MOVER_TEST_S3_ENDPOINT is not set: run the tests with scripts/test.sh, which starts a SeaweedFS S3 server on 127.0.0.1");
    let bucket = std::env::var("MOVER_TEST_S3_BUCKET").unwrap_or_else(|_| "mover-test".into());
    (endpoint, bucket)
}

/// Deterministic pseudo-random bytes.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    h.finalize_xof().fill(&mut v);
    v
}

/// A sparse volume image: random regions, compressible text, duplicated blocks and holes.
pub fn make_volume(path: &Path, size: u64, seed: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut off = 0u64;
    let mut i = 0u64;
    while off < size {
        let len = (((seed + i) * 2_654_435_761) % (3 << 20) + 65_536).min(size - off);
        match i % 4 {
            0 => f.write_all_at(&noise(seed * 1000 + i, len as usize), off).unwrap(),
            1 => f.write_all_at(&b"the quick brown fox jumps over the lazy dog\n".repeat(len as usize / 44 + 1)[..len as usize], off).unwrap(),
            2 => {}                                                        // hole
            _ => f.write_all_at(&noise(seed, len as usize), off).unwrap(), // repeats: dedup
        }
        off += len;
        i += 1;
    }
}

/// Overwrites ~`count` scattered 64 KiB regions; returns them as extents.
pub fn modify(path: &Path, count: u64, seed: u64) -> Vec<(u64, u64)> {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let size = f.metadata().unwrap().len();
    let mut ext = Vec::new();
    for k in 0..count {
        let off = ((seed * 7919 + k * 104_729) * 4096 * 37) % (size - 65_536) / 4096 * 4096;
        f.write_all_at(&noise(seed * 77 + k, 65_536), off).unwrap();
        ext.push((off, 65_536));
    }
    f.sync_all().unwrap();
    ext
}

pub fn hash_prefix(path: &Path, len: u64) -> String {
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = f.read(&mut buf[..(left.min(1 << 20)) as usize]).unwrap();
        assert!(n > 0, "{} shorter than {len}", path.display());
        h.update(&buf[..n]);
        left -= n as u64;
    }
    h.finalize().to_hex().to_string()
}

pub fn hash(path: &Path) -> String {
    hash_prefix(path, std::fs::metadata(path).unwrap().len())
}

pub fn write_extents(path: &Path, ext: &[(u64, u64)]) {
    let mut f = std::fs::File::create(path).unwrap();
    for (o, l) in ext {
        writeln!(f, "{o} {l}").unwrap();
    }
}

/// A loop device over a new image file; detached on drop.
pub struct Loop {
    pub dev: PathBuf,
}

impl Loop {
    pub fn new(img: &Path, size: u64) -> Loop {
        if !img.exists() {
            std::fs::File::create(img).unwrap().set_len(size).unwrap();
        }
        let o = Command::new("losetup").args(["--direct-io=on", "-f", "--show"]).arg(img).output().expect("losetup (util-linux) is needed");
        assert!(o.status.success(), "losetup failed (root and loop devices are needed): {}", String::from_utf8_lossy(&o.stderr));
        Loop { dev: PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()) }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// A process run to its end, with what the kernel measured of it.
pub struct Measured {
    pub code: Option<i32>,
    pub stderr: String,
    /// Peak resident memory (`ru_maxrss`), MiB.
    pub max_rss_mib: u64,
    pub elapsed: std::time::Duration,
}

/// Runs `c` and measures its peak memory and time, through `/usr/bin/time` (GNU time): its
/// child starts from a small process, so the peak is the command's own (a child forked
/// from this large test process would count the test's memory as its own until exec).
pub fn measured(c: Command) -> Measured {
    let err = tempfile::NamedTempFile::new().unwrap();
    let rss = tempfile::NamedTempFile::new().unwrap();
    let mut t = Command::new("/usr/bin/time");
    t.args(["-f", "%M", "-o"]).arg(rss.path()).arg(c.get_program()).args(c.get_args());
    for (k, v) in c.get_envs() {
        match v {
            Some(v) => t.env(k, v),
            None => t.env_remove(k),
        };
    }
    if let Some(d) = c.get_current_dir() {
        t.current_dir(d);
    }
    t.stdout(std::process::Stdio::null()).stderr(err.reopen().unwrap());
    let t0 = std::time::Instant::now();
    let status = t.status().expect("/usr/bin/time (apt-get install time)");
    let elapsed = t0.elapsed();
    let text = std::fs::read_to_string(rss.path()).unwrap_or_default();
    // A killed command makes time write "Command terminated by signal N" first.
    let kib: u64 = text.lines().filter_map(|l| l.trim().parse().ok()).next_back().unwrap_or_else(|| panic!("no peak memory from time: {text}"));
    Measured { code: status.code(), stderr: std::fs::read_to_string(err.path()).unwrap_or_default(), max_rss_mib: kib / 1024, elapsed }
}
