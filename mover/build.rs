// Records the commit the binary was built from (`mover --version`).
fn main() {
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| std::env::var("MOVER_COMMIT").unwrap_or_else(|_| "unknown".into()));
    println!("cargo:rustc-env=MOVER_COMMIT={commit}");
    println!("cargo:rerun-if-env-changed=MOVER_COMMIT");
    // HEAD, and the branch file it names (a commit changes that file, not the directory).
    let mut watch = vec!["../.git/HEAD".to_string(), "../.git/packed-refs".to_string()];
    if let Ok(head) = std::fs::read_to_string("../.git/HEAD") {
        if let Some(r) = head.trim().strip_prefix("ref: ") {
            watch.push(format!("../.git/{r}"));
        }
    }
    for p in watch {
        if std::path::Path::new(&p).exists() {
            println!("cargo:rerun-if-changed={p}");
        }
    }
}
