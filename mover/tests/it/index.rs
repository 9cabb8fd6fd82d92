use super::*;

#[test]
fn deleted_cache_and_deleted_index_segments_are_rebuilt() {
    let e = Env::new();
    let src = e.path("disk.img");
    make_volume(&src, 32 << 20, 7);
    let s = e.json(&["backup", src.to_str().unwrap()]);
    std::fs::remove_dir_all(e.path("cache")).unwrap();
    let out = e.path("a.img");
    e.ok(&["restore", "latest", out.to_str().unwrap()]);
    assert_eq!(hash(&src), hash(&out));

    // Lose every index segment: restore fails, naming a chunk; rebuild from packs fixes it.
    for f in std::fs::read_dir(Path::new(&e.repo).join("index")).unwrap() {
        std::fs::remove_file(f.unwrap().path()).unwrap();
    }
    std::fs::remove_dir_all(e.path("cache")).unwrap();
    let err = e.fail(&["restore", "latest", e.path("b.img").to_str().unwrap()]);
    assert!(err.contains("not in the index"), "{err}");
    let r = e.json(&["index", "rebuild"]);
    assert!(r["packs_from_trailers"].as_u64().unwrap() >= 1, "{r}");
    assert!(r["segments_written"].as_array().unwrap().len() >= 1);
    std::fs::remove_dir_all(e.path("cache")).unwrap();
    let out = e.path("c.img");
    e.ok(&["restore", s["snapshot_id"].as_str().unwrap(), out.to_str().unwrap()]);
    assert_eq!(hash(&src), hash(&out));
}
