#![no_main]
//! Feeds arbitrary bytes to every parser of store objects: pack trailer and footer, index
//! segment (plain and sealed), manifest, segment map, segment group, key file, config.
use libfuzzer_sys::fuzz_target;
use mover_format::crypto::{KeyFile, Keys, MasterKey};
use mover_format::{index, manifest::Manifest, pack, tree};

fuzz_target!(|b: &[u8]| {
    let k = Keys::derive(&MasterKey::generate());
    let _ = pack::decode_trailer(b, b.len() as u64);
    let _ = pack::read_pack(&k, b);
    if b.len() >= pack::FOOTER_LEN {
        let _ = pack::parse_footer(&b[b.len() - pack::FOOTER_LEN..], b.len() as u64);
    }
    let _ = index::decode_plain(b);
    let _ = index::open(&k, b);
    let _ = Manifest::open(&k, b);
    let _ = tree::SegmentMap::decode(b);
    let _ = tree::SegmentGroup::decode(b);
    let _ = KeyFile::from_bytes(b);
    let _ = mover_format::config::RepoConfig::parse_unverified(b);
});
