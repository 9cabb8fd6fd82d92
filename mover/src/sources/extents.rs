//! Changed-extents files: lines `OFFSET LENGTH` (bytes, decimal or 0x hex; `#` comments),
//! or JSON: `[{"offset": N, "length": N}, …]` or `[[N, N], …]`.

use mover_engine::{Error, Result, ResultExt};
use std::path::Path;

fn num(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

/// Parses extents, sorted and merged.
pub fn parse(text: &str, what: &str) -> Result<Vec<(u64, u64)>> {
    let t = text.trim_start();
    let mut out: Vec<(u64, u64)> = Vec::new();
    if t.starts_with('[') {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum E {
            Obj { offset: u64, length: u64 },
            Pair(u64, u64),
        }
        let v: Vec<E> = serde_json::from_str(t).map_err(|e| Error::invalid(format!("{what}: not a JSON list of extents: {e}")))?;
        for e in v {
            out.push(match e {
                E::Obj { offset, length } => (offset, length),
                E::Pair(o, l) => (o, l),
            });
        }
    } else {
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let parts: Vec<&str> = line.split_whitespace().collect();
            let (o, l) = match parts.as_slice() {
                [o, l] => (num(o), num(l)),
                _ => (None, None),
            };
            match (o, l) {
                (Some(o), Some(l)) => out.push((o, l)),
                _ => return Err(Error::invalid(format!("{what} line {}: expected 'OFFSET LENGTH' in bytes, found '{line}'", i + 1))),
            }
        }
    }
    for &(o, l) in &out {
        if l == 0 || o.checked_add(l).is_none() {
            return Err(Error::invalid(format!("{what}: extent {o}+{l} is empty or overflows")));
        }
    }
    out.sort();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (o, l) in out {
        if let Some(last) = merged.last_mut() {
            if o <= last.0 + last.1 {
                let end = (o + l).max(last.0 + last.1);
                last.1 = end - last.0;
                continue;
            }
        }
        merged.push((o, l));
    }
    Ok(merged)
}

/// The largest changed-extents file read (about two million lines): `/dev/zero` or a
/// runaway generator must not grow memory without bound.
pub const MAX_FILE: u64 = 64 << 20;

pub fn read(path: &Path) -> Result<Vec<(u64, u64)>> {
    use std::io::Read;
    let what = format!("changed-extents file {}", path.display());
    let f = std::fs::File::open(path).with_context(|| format!("reading {what}"))?;
    let mut bytes = Vec::new();
    f.take(MAX_FILE + 1).read_to_end(&mut bytes).with_context(|| format!("reading {what}"))?;
    if bytes.len() as u64 > MAX_FILE {
        return Err(Error::invalid(format!("{what}: longer than {MAX_FILE} bytes; merge the extents, or back up without them")));
    }
    let text = String::from_utf8(bytes).map_err(|_| Error::invalid(format!("{what}: not text")))?;
    parse(&text, &what)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn lines_json_and_errors() {
        assert_eq!(parse("0 10\n# c\n5 10\n100 0x10\n", "t").unwrap(), vec![(0, 15), (100, 16)]);
        assert_eq!(parse(r#"[{"offset":4,"length":2},[0,1]]"#, "t").unwrap(), vec![(0, 1), (4, 2)]);
        let e = parse("0 10\nbad\n", "f").unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
        assert!(parse("5 0", "t").is_err());
        assert!(parse("[1,2", "t").is_err());
    }

    /// `/dev/zero` named as an extents file: refused after a bounded read.
    #[test]
    fn an_endless_file_is_read_only_up_to_the_bound() {
        let t0 = std::time::Instant::now();
        let e = read(Path::new("/dev/zero")).unwrap_err().to_string();
        assert!(e.contains("longer than") && e.contains("/dev/zero"), "{e}");
        assert!(t0.elapsed() < std::time::Duration::from_secs(10));
    }
}
