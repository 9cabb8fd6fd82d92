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
    for p in ["../.git/HEAD", "../.git/refs/heads"] {
        if std::path::Path::new(p).exists() {
            println!("cargo:rerun-if-changed={p}");
        }
    }
}
