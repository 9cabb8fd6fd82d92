//! Disaster recovery through the daemon: copy to a second site (an S3 repository), a
//! scheduled verify, drills, and the recovery-point report over gRPC and in /metrics.

use super::daemon::{backup_req, client, metric, rt, wait_metric, watch_end, Daemon};
use super::{flip_bytes_in_largest_of, hash, make_volume, modify, pack_files, rand_suffix, s3_env};
use mover_protocol::v1 as pb;
use std::time::{Duration, Instant};

#[test]
fn the_daemon_copies_to_a_second_site_verifies_on_schedule_drills_and_reports_rpo_and_rto() {
    let dir = tempfile::tempdir().unwrap();
    let (endpoint, bucket) = s3_env();
    let extra = format!(
        "status_interval_seconds = 1\n[repositories.dr]\nurl = \"s3://{bucket}/dr-{}\"\ns3_endpoint = \"{endpoint}\"\npassword_env = \"MOVER_TEST_DAEMON_PW\"\n\
         init_if_missing = true\nverify_interval_seconds = 3\nverify_read_data_percent = 100\nstatus_groups = [\"vms/web\"]\n",
        rand_suffix()
    );
    let d = Daemon::start(dir.path(), &extra, true);
    let src = dir.path().join("vols/disk.img");
    make_volume(&src, 24 << 20, 31);
    rt().block_on(async {
        let mut c = client(&d).await;
        let ch = mover::client::connect(&mover::client::Conn { server: d.grpc.clone(), ..Default::default() }).await.unwrap();
        let mut rc = pb::repository_service_client::RepositoryServiceClient::new(ch);
        let mut snaps = Vec::new();
        let mut first_packs = Vec::new();
        for i in 0..2 {
            if i > 0 {
                modify(&src, 3, 7);
            }
            let mut req = backup_req("disk", &src);
            req.group = "vms/web".into();
            req.parent = if i > 0 { "latest".into() } else { String::new() };
            let t = c.start_backup(req).await.unwrap().into_inner();
            let end = watch_end(&mut c, &t.id).await;
            assert_eq!(end.state(), pb::TransferState::Succeeded, "{}", end.error);
            snaps.push(end.snapshot_id);
            if i == 0 {
                first_packs = pack_files(&dir.path().join("repo"));
            }
        }

        // Copy to the second site: the incremental as an incremental.
        let req = pb::StartCopyRequest { repository: "main".into(), target_repository: "dr".into(), ..Default::default() };
        let t = c.start_copy(req.clone()).await.unwrap().into_inner();
        assert_eq!(t.kind(), pb::TransferKind::Copy);
        let end = watch_end(&mut c, &t.id).await;
        assert_eq!(end.state(), pb::TransferState::Succeeded, "{}", end.error);
        assert_eq!(end.copied.len(), 2, "{:?}", end.copied);
        assert!(end.copied.iter().all(|x| x.copied));
        assert_eq!(end.copied[1].incremental_to, end.copied[0].target_id);
        assert_eq!(end.copied.iter().map(|x| x.source_id.clone()).collect::<Vec<_>>(), snaps);
        let t = c.start_copy(req).await.unwrap().into_inner();
        let again = watch_end(&mut c, &t.id).await;
        assert!(again.copied.iter().all(|x| !x.copied) && again.stats.unwrap().bytes_uploaded == 0, "a second copy sends nothing: {:?}", again.copied);
        let newest_copy = end.copied[1].target_id.clone();

        // The scheduled verify of the DR repository (every 3 s here): one that started after
        // the copy ended covers the copies.
        let t0 = Instant::now();
        let verify = loop {
            let l = c.list_transfers(pb::ListTransfersRequest::default()).await.unwrap().into_inner();
            let done = l.transfers.into_iter().find(|t| {
                t.kind() == pb::TransferKind::Verify
                    && t.repository == "dr"
                    && t.started_unix_ms > end.finished_unix_ms
                    && matches!(t.state(), pb::TransferState::Succeeded | pb::TransferState::Failed)
            });
            if let Some(v) = done {
                break v;
            }
            assert!(t0.elapsed() < Duration::from_secs(60), "no scheduled verify ran");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_eq!(verify.caller, "scheduler");
        assert_eq!(verify.state(), pb::TransferState::Succeeded, "{}", verify.error);
        let v = verify.verify.clone().unwrap();
        assert!(v.ok && v.read_data_percent == 100 && v.packs_read > 0 && v.damaged.is_empty(), "{v:?}");

        // A drill at the second site.
        let req = pb::StartDrillRequest { repository: "dr".into(), snapshot: "latest".into(), group: "vms/web".into(), ..Default::default() };
        let t = c.start_drill(req).await.unwrap().into_inner();
        let drill = watch_end(&mut c, &t.id).await;
        assert_eq!(drill.state(), pb::TransferState::Succeeded, "{}", drill.error);
        assert_eq!(drill.snapshot_id, newest_copy);
        assert_eq!(drill.drill_volumes.len(), 1);
        assert_eq!(drill.drill_volumes[0].segments_verified, 6);
        assert!(std::fs::read_dir(dir.path().join("state/drill")).map(|d| d.count()).unwrap_or(0) == 0, "scratch cleaned up");

        // The report: newest, verified and drilled are the newest copy; a restore time.
        let st = rc.get_status(pb::GetStatusRequest { repository: "dr".into() }).await.unwrap().into_inner();
        assert!(st.last_verify_ok && st.last_verify_unix_ms.is_some(), "{st:?}");
        let g = &st.groups[0];
        assert_eq!((g.group.as_str(), g.snapshots), ("vms/web", 2));
        assert_eq!(g.newest_snapshot, newest_copy);
        assert_eq!(g.newest_verified.as_deref(), Some(newest_copy.as_str()));
        assert_eq!(g.newest_drilled.as_deref(), Some(newest_copy.as_str()));
        let rto = g.projected_restore_seconds.unwrap();
        assert!(rto > 0.0 && (rto - drill.drill_volumes[0].projected_restore_seconds).abs() < 1e-6 * rto.max(1.0), "{g:?}");
        // Metrics with bounded labels: the configured group by name, the rest as 'other'.
        let l = "{group=\"vms/web\",repository=\"dr\"}";
        wait_metric(&d, &format!("mover_projected_restore_seconds{l}"), |v| v.is_finite() && v > 0.0);
        wait_metric(&d, &format!("mover_drilled_snapshot_age_seconds{l}"), f64::is_finite);
        wait_metric(&d, &format!("mover_verified_snapshot_age_seconds{l}"), f64::is_finite);
        assert!(wait_metric(&d, "mover_verify_last_success_timestamp_seconds{repository=\"dr\"}", |v| v > 0.0) > 1e9);
        wait_metric(&d, "mover_snapshot_age_seconds{group=\"other\",repository=\"main\"}", |v| v.is_finite());
        assert_eq!(metric(&d, "mover_drilled_snapshot_age_seconds{group=\"other\",repository=\"main\"}"), Some(f64::INFINITY), "main was never drilled");
        assert!(metric(&d, "mover_verify_runs_total{repository=\"dr\",result=\"ok\"}").unwrap() >= 2.0, "scheduled again and again");

        // A flipped bit at the primary: the verify fails naming the pack and both snapshots.
        // The pack is the full backup's largest (every chunk in it is the full's), flipped at
        // three places so that one hits a chunk the incremental kept (it changed 3 × 64 KiB
        // of 24 MiB); the incremental's own packs can be larger and only it needs them.
        let pack = flip_bytes_in_largest_of(&first_packs, &[0.25, 0.5, 0.75]);
        let pack_id = pack.file_name().unwrap().to_str().unwrap().to_string();
        let t = c.start_verify(pb::StartVerifyRequest { repository: "main".into(), read_data_percent: 100, ..Default::default() }).await.unwrap().into_inner();
        let bad = watch_end(&mut c, &t.id).await;
        assert_eq!(bad.state(), pb::TransferState::Failed);
        assert_eq!(bad.error_kind, "corrupt");
        assert!(bad.error.contains(&format!("pack {pack_id}")), "{}", bad.error);
        let v = bad.verify.clone().unwrap();
        assert!(!v.ok);
        let dmg = v.damaged.iter().find(|x| x.object == format!("pack {pack_id}")).unwrap_or_else(|| panic!("{v:?}"));
        let mut needed = dmg.snapshots.clone();
        needed.sort();
        let mut all = snaps.clone();
        all.sort();
        assert_eq!(needed, all, "both snapshots need the damaged pack");
        wait_metric(&d, "mover_verify_damaged_objects{repository=\"main\"}", |v| v >= 1.0);
        assert_eq!(metric(&d, "mover_verify_runs_total{repository=\"main\",result=\"damaged\"}"), Some(1.0));
        let st = rc.get_status(pb::GetStatusRequest { repository: "main".into() }).await.unwrap().into_inner();
        assert!(!st.last_verify_ok && st.groups[0].newest_damaged && st.groups[0].newest_verified.is_none(), "{st:?}");
        // The copy at the second site still restores byte-exact.
        let out = dir.path().join("vols/from-dr.img");
        let r = c
            .start_restore(pb::StartRestoreRequest {
                repository: "dr".into(),
                snapshot: newest_copy.clone(),
                target: super::daemon::path_ref(&out),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let r = watch_end(&mut c, &r.id).await;
        assert_eq!(r.state(), pb::TransferState::Succeeded, "{}", r.error);
        assert_eq!(hash(&out), hash(&src));
    });
    // Results are kept in the state directory.
    let records: Vec<String> =
        std::fs::read_dir(dir.path().join("state/transfers")).unwrap().map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap()).collect();
    assert!(records.iter().any(|r| r.contains("\"kind\": \"verify\"") && r.contains("\"damaged\"")), "verify results kept");
    assert!(records.iter().any(|r| r.contains("\"kind\": \"drill\"") && r.contains("projected_restore_s")), "drill results kept");
}

#[test]
fn copy_verify_and_drill_requests_are_checked_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), "", true);
    rt().block_on(async {
        let mut c = client(&d).await;
        let e = c.start_copy(pb::StartCopyRequest { repository: "main".into(), target_repository: "main".into(), ..Default::default() }).await.unwrap_err();
        assert!(e.message().contains("is the source repository"), "{e:?}");
        let e = c.start_copy(pb::StartCopyRequest { repository: "main".into(), target_repository: "nowhere".into(), ..Default::default() }).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound);
        assert!(e.message().contains("'nowhere' is not configured"), "{e:?}");
        let e = c.start_verify(pb::StartVerifyRequest { repository: "main".into(), read_data_percent: 101, ..Default::default() }).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        let e = c.start_drill(pb::StartDrillRequest { repository: "main".into(), snapshot: "latest".into(), ..Default::default() }).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
        let l = c.list_transfers(pb::ListTransfersRequest::default()).await.unwrap().into_inner();
        assert!(l.transfers.is_empty(), "refused requests start nothing");
    });
}
