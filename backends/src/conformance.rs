//! One conformance suite for every [`Storage`]: local directory, S3 against a real server,
//! and the fault-injecting wrapper. Each check returns a description of the first
//! violation; the integration tests of each backend call [`run_all`].

use bytes::Bytes;
use mover_format::storage::{list_all, ErrorKind, PutOutcome, Storage};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

type R = Result<(), String>;

fn fail(msg: impl Into<String>) -> R {
    Err(msg.into())
}

/// Runs every check under `base` (a unique prefix such as `conformance-<random>/`).
pub async fn run_all(s: Arc<dyn Storage>, base: &str) -> R {
    put_get_roundtrip(&*s, base).await?;
    bounded_get(&*s, base).await?;
    create_only(&*s, base).await?;
    missing_objects(&*s, base).await?;
    ranges(&*s, base).await?;
    listing(s.clone(), base).await?;
    delete_idempotent(&*s, base).await?;
    cancellation(&*s, base).await?;
    concurrent_create(s.clone(), base).await?;
    Ok(())
}

pub async fn put_get_roundtrip(s: &dyn Storage, base: &str) -> R {
    let c = CancellationToken::new();
    let name = format!("{base}rt/a");
    let data = Bytes::from((0..100_000u32).map(|i| (i * 7 % 251) as u8).collect::<Vec<_>>());
    let out = s.put(&name, data.clone(), &c).await.map_err(|e| format!("{e:#}"))?;
    if out != PutOutcome::Created {
        return fail(format!("first put of {name} returned {out:?}"));
    }
    let got = s.get(&name, u64::MAX, &c).await.map_err(|e| format!("{e:#}"))?;
    if got != data {
        return fail("get returned different bytes than put");
    }
    let empty = format!("{base}rt/empty");
    s.put(&empty, Bytes::new(), &c).await.map_err(|e| format!("{e:#}"))?;
    if !s.get(&empty, u64::MAX, &c).await.map_err(|e| format!("{e:#}"))?.is_empty() {
        return fail("empty object is not empty");
    }
    match s.head(&name, &c).await.map_err(|e| format!("{e:#}"))? {
        Some(n) if n == data.len() as u64 => Ok(()),
        other => fail(format!("head of {name} returned {other:?}")),
    }
}

pub async fn create_only(s: &dyn Storage, base: &str) -> R {
    let c = CancellationToken::new();
    let name = format!("{base}co/x");
    s.put(&name, Bytes::from_static(b"first"), &c).await.map_err(|e| format!("{e:#}"))?;
    let out = s.put(&name, Bytes::from_static(b"second"), &c).await.map_err(|e| format!("{e:#}"))?;
    if out != PutOutcome::Existed {
        return fail(format!("second put returned {out:?}, not Existed"));
    }
    let got = s.get(&name, u64::MAX, &c).await.map_err(|e| format!("{e:#}"))?;
    if &got[..] != b"first" {
        return fail("a second put replaced the object");
    }
    Ok(())
}

/// An object larger than the reader allows is refused, naming it, with a permanent error.
pub async fn bounded_get(s: &dyn Storage, base: &str) -> R {
    let c = CancellationToken::new();
    let name = format!("{base}bounded/obj");
    s.put(&name, Bytes::from(vec![7u8; 10_000]), &c).await.map_err(|e| format!("{e:#}"))?;
    match s.get(&name, 9_999, &c).await {
        Err(e) if e.kind == ErrorKind::Permanent && e.to_string().contains(&name) && e.to_string().contains("10000") => {}
        other => return fail(format!("get of a 10000-byte object with a 9999-byte bound returned {:?}", other.map(|b| b.len()))),
    }
    match s.get(&name, 10_000, &c).await {
        Ok(b) if b.len() == 10_000 => Ok(()),
        other => fail(format!("get with an exact bound returned {:?}", other.map(|b| b.len()))),
    }
}

pub async fn missing_objects(s: &dyn Storage, base: &str) -> R {
    let c = CancellationToken::new();
    let name = format!("{base}missing/none");
    match s.get(&name, u64::MAX, &c).await {
        Err(e) if e.kind == ErrorKind::NotFound => {
            if !e.to_string().contains(&name) {
                return fail(format!("not-found error does not name the object: {e}"));
            }
        }
        other => return fail(format!("get of a missing object returned {:?}", other.map(|b| b.len()))),
    }
    match s.get_range(&name, 0, 1, &c).await {
        Err(e) if e.kind == ErrorKind::NotFound => {}
        other => return fail(format!("get_range of a missing object returned {:?}", other.map(|b| b.len()))),
    }
    match s.head(&name, &c).await {
        Ok(None) => Ok(()),
        other => fail(format!("head of a missing object returned {other:?}")),
    }
}

pub async fn ranges(s: &dyn Storage, base: &str) -> R {
    let c = CancellationToken::new();
    let name = format!("{base}range/r");
    let data: Vec<u8> = (0..10_000u32).map(|i| (i % 253) as u8).collect();
    s.put(&name, Bytes::from(data.clone()), &c).await.map_err(|e| format!("{e:#}"))?;
    for (off, len) in [(0u64, 1u64), (17, 1000), (9_000, 1_000), (0, 10_000)] {
        let got = s.get_range(&name, off, len, &c).await.map_err(|e| format!("{e:#}"))?;
        if got[..] != data[off as usize..(off + len) as usize] {
            return fail(format!("range {off}+{len} returned wrong bytes"));
        }
    }
    match s.get_range(&name, 9_990, 20, &c).await {
        Err(e) if e.kind == ErrorKind::Permanent => Ok(()),
        other => fail(format!("a range past the end returned {:?}", other.map(|b| b.len()))),
    }
}

pub async fn listing(s: Arc<dyn Storage>, base: &str) -> R {
    let c = CancellationToken::new();
    let n = 1_005usize;
    let mut names: Vec<String> = (0..n).map(|i| format!("{base}list/{:02x}/obj{i:05}", i % 7)).collect();
    let mut set = tokio::task::JoinSet::new();
    for w in 0..16usize {
        let mine: Vec<String> = names.iter().skip(w).step_by(16).cloned().collect();
        let s = s.clone();
        set.spawn(async move {
            for name in mine {
                s.put(&name, Bytes::from_static(b"x"), &CancellationToken::new()).await?;
            }
            Ok::<(), mover_format::storage::StorageError>(())
        });
    }
    while let Some(r) = set.join_next().await {
        r.map_err(|e| e.to_string())?.map_err(|e| format!("{e:#}"))?;
    }
    s.put(&format!("{base}listother/z"), Bytes::from_static(b"y"), &c).await.map_err(|e| format!("{e:#}"))?;
    let listed = list_all(&*s, &format!("{base}list/"), &c).await.map_err(|e| format!("{e:#}"))?;
    names.sort();
    let got: Vec<String> = listed.iter().map(|o| o.name.clone()).collect();
    if got != names {
        return fail(format!("listing returned {} names, expected {} in order", got.len(), names.len()));
    }
    if listed.iter().any(|o| o.size != 1) {
        return fail("listing reported a wrong size");
    }
    let page = s.list_page(&format!("{base}list/"), None, &c).await.map_err(|e| format!("{e:#}"))?;
    if page.next.is_none() || page.objects.len() >= n {
        return fail("a listing of more than 1000 objects did not paginate");
    }
    // From a point on (S3 `StartAfter`): only the names after it, across pages too.
    for from in [0usize, 3, 990] {
        let after = &names[from];
        let listed = mover_format::storage::list_all_after(&*s, &format!("{base}list/"), Some(after), &c).await.map_err(|e| format!("{e:#}"))?;
        let got: Vec<&str> = listed.iter().map(|o| o.name.as_str()).collect();
        let want: Vec<&str> = names[from + 1..].iter().map(String::as_str).collect();
        if got != want {
            return fail(format!("a listing after {after} returned {} names, expected the {} after it in order", got.len(), want.len()));
        }
    }
    Ok(())
}

pub async fn delete_idempotent(s: &dyn Storage, base: &str) -> R {
    let c = CancellationToken::new();
    let name = format!("{base}del/d");
    s.put(&name, Bytes::from_static(b"d"), &c).await.map_err(|e| format!("{e:#}"))?;
    s.delete(&name, &c).await.map_err(|e| format!("{e:#}"))?;
    if s.head(&name, &c).await.map_err(|e| format!("{e:#}"))?.is_some() {
        return fail("object still there after delete");
    }
    s.delete(&name, &c).await.map_err(|e| format!("deleting a missing object failed: {e:#}"))?;
    let out = s.put(&name, Bytes::from_static(b"again"), &c).await.map_err(|e| format!("{e:#}"))?;
    if out != PutOutcome::Created {
        return fail("put after delete did not create");
    }
    Ok(())
}

pub async fn cancellation(s: &dyn Storage, base: &str) -> R {
    let c = CancellationToken::new();
    c.cancel();
    let name = format!("{base}cancel/c");
    match s.put(&name, Bytes::from_static(b"c"), &c).await {
        Err(e) if e.kind == ErrorKind::Cancelled => {}
        other => return fail(format!("put with a cancelled token returned {other:?}")),
    }
    let live = CancellationToken::new();
    if s.head(&name, &live).await.map_err(|e| format!("{e:#}"))?.is_some() {
        return fail("a cancelled put left an object");
    }
    Ok(())
}

pub async fn concurrent_create(s: Arc<dyn Storage>, base: &str) -> R {
    let name = format!("{base}race/lock");
    let mut set = tokio::task::JoinSet::new();
    for i in 0..8u8 {
        let s = s.clone();
        let name = name.clone();
        set.spawn(async move { (i, s.put(&name, Bytes::from(vec![i; 1000]), &CancellationToken::new()).await) });
    }
    let mut winners = Vec::new();
    while let Some(r) = set.join_next().await {
        let (i, r) = r.map_err(|e| e.to_string())?;
        if r.map_err(|e| format!("{e:#}"))? == PutOutcome::Created {
            winners.push(i);
        }
    }
    if winners.len() != 1 {
        return fail(format!("{} concurrent creates succeeded, expected exactly 1", winners.len()));
    }
    let got = s.get(&name, u64::MAX, &CancellationToken::new()).await.map_err(|e| format!("{e:#}"))?;
    if got[..] != vec![winners[0]; 1000][..] {
        return fail("the object does not hold the winner's bytes");
    }
    Ok(())
}
