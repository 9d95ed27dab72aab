//! The coordinator's edges against the real binary: the shared token on both APIs (and never
//! in the logs), TLS on both listeners, and malformed requests of every kind.

mod support;

use std::sync::Arc;

use ferrata_rpc::client::{ClientConfig, TcClient};
use ferrata_rpc::{ErrorCode, pb};
use support::*;

type Result<T = ()> = anyhow::Result<T>;

use pb::GlobalStatus as G;

const TOKEN: &str = "s3cr3t-T0ken-4f9a7c";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_is_required_on_both_apis_and_never_logged() -> Result {
    let tc = Tc::start(TcOptions {
        token: Some(TOKEN.into()),
        log_level: Some("debug".into()),
        ..TcOptions::config(FAST_CONFIG)
    })
    .await?;

    // gRPC, without and with a wrong token.
    for token in [
        None,
        Some("wrong-token"),
        Some("s3cr3t-T0ken-4f9a7"),
        Some("s3cr3t-T0ken-4f9a7cX"),
    ] {
        let c = TcClient::connect(&ClientConfig {
            token: token.map(str::to_owned),
            ..tc.client_config()
        })
        .await?;
        let e = begin(&c, 0).await.unwrap_err();
        let e = e.downcast_ref::<tonic::Status>().expect("a gRPC status");
        assert_code(e, ErrorCode::Unauthenticated);
        assert_code(
            &register(&c, "1-1", "db1", t_rows(&["1"]), 0).await.unwrap_err(),
            ErrorCode::Unauthenticated,
        );
        assert_code(
            &lock_query(&c, "", "db1", t_rows(&["1"]), 0).await.unwrap_err(),
            ErrorCode::Unauthenticated,
        );
        let e = raw_attach(&c, hello("rm-intruder", &["db1"]))
            .await
            .err()
            .expect("refused");
        assert_code(&e, ErrorCode::Unauthenticated);
        let rec = Recorder::new();
        assert!(TestRm::attach(&c, "rm-intruder", &["db1"], &rec).await.is_err());
    }

    // With the right token everything works, resource managers included.
    let c = tc.client().await?;
    let rec = Recorder::new();
    let _rm = TestRm::attach(&c, "rm-db1", &["db1"], &rec).await?;
    let xid = begin(&c, 0).await?;
    let b = register(&c, &xid, "db1", t_rows(&["1"]), 0).await?;
    assert_eq!(status_of(&rollback(&c, &xid).await?), G::Rollbacked);
    assert_eq!(rec.actions(), vec![(pb::Phase2Action::Rollback, b)]);

    // HTTP: every /v1 route needs the token; health and metrics do not.
    let http = tc.http();
    for bad in [None, Some("wrong-token"), Some("S3CR3T-t0KEN-4F9A7C")] {
        let anon = http.with_token(bad);
        anon.post("/v1/transactions", Some("{}"))
            .await?
            .assert_error(401, "unauthenticated");
        anon.get(&format!("/v1/transactions/{xid}"))
            .await?
            .assert_error(401, "unauthenticated");
        anon.get("/v1/transactions").await?.assert_error(401, "unauthenticated");
        anon.post(&format!("/v1/transactions/{xid}/commit"), None)
            .await?
            .assert_error(401, "unauthenticated");
        anon.get("/v1/locks").await?.assert_error(401, "unauthenticated");
        assert_eq!(anon.get("/healthz").await?.status, 200);
        assert_eq!(anon.get("/metrics").await?.status, 200);
    }
    let r = http.post("/v1/transactions", Some("{}")).await?;
    assert_eq!(r.status, 201, "{r:?}");
    let v = http.get_json(&format!("/v1/transactions/{xid}")).await?;
    assert_eq!(v["status"], "Rollbacked");

    let logs = tc.logs_text();
    assert!(logs.contains("DEBUG"), "debug logging is on:\n{logs}");
    assert!(!logs.contains(TOKEN), "the token leaked into the logs:\n{logs}");
    // Nor in the process's visible command line.
    let pid = tc.pid().expect("running");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    assert!(!String::from_utf8_lossy(&cmdline).contains(TOKEN));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_can_come_from_a_file() -> Result {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("token");
    std::fs::write(&path, "from-a-file-9d2e\n")?;
    let mut tc = Tc::with_config(&format!("token_file = {:?}\n", path.display().to_string())).await?;
    let e = begin(&tc.client().await?, 0).await.unwrap_err();
    assert_code(
        e.downcast_ref::<tonic::Status>().expect("status"),
        ErrorCode::Unauthenticated,
    );
    tc.opts.token = None;
    let c = TcClient::connect(&ClientConfig {
        token: Some("from-a-file-9d2e".into()),
        ..tc.client_config()
    })
    .await?;
    begin(&c, 0).await?;
    tc.http()
        .with_token(None)
        .get("/v1/locks")
        .await?
        .assert_error(401, "unauthenticated");
    assert_eq!(
        tc.http()
            .with_token(Some("from-a-file-9d2e"))
            .get("/v1/locks")
            .await?
            .status,
        200
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_protects_both_listeners() -> Result {
    let certs = Certs::self_signed()?;
    let tc = Tc::start(TcOptions {
        tls: Some(Arc::clone(&certs)),
        ..TcOptions::config(FAST_CONFIG)
    })
    .await?;
    tc.wait_log(|l| l.contains("ferrata-tc serving") && l.contains("tls=true"))
        .await?;

    // gRPC over TLS, both services.
    let c = tc.client().await?;
    let rec = Recorder::new();
    let _rm = TestRm::attach(&c, "rm-db1", &["db1"], &rec).await?;
    let xid = begin(&c, 0).await?;
    let b = register(&c, &xid, "db1", t_rows(&["1"]), 0).await?;
    commit(&c, &xid).await?;
    wait_status(&c, &xid, G::Committed).await?;
    assert_eq!(rec.actions(), vec![(pb::Phase2Action::Commit, b)]);
    // By name as well as by address.
    let by_name = TcClient::connect(&ClientConfig {
        endpoint: format!("https://localhost:{}", tc.rpc.port()),
        ..tc.client_config()
    })
    .await?;
    assert_eq!(status_of(&status(&by_name, &xid).await?), G::Committed);

    // HTTP over TLS.
    let http = tc.http();
    let r = http.post("/v1/transactions", Some(r#"{"name": "over tls"}"#)).await?;
    assert_eq!(r.status, 201, "{r:?}");
    let v = http.get_json(&format!("/v1/transactions/{xid}")).await?;
    assert_eq!(v["status"], "Committed");
    assert_eq!(http.get("/healthz").await?.status, 200);

    // Plaintext is refused on both.
    let plain = Http {
        tls_ca: None,
        ..http.clone()
    };
    assert!(
        plain.get("/healthz").await.is_err(),
        "plaintext HTTP must not be served"
    );
    let plain_grpc = async {
        let c = TcClient::connect(&ClientConfig {
            endpoint: format!("http://{}", tc.rpc),
            tls_ca: None,
            ..tc.client_config()
        })
        .await?;
        begin(&c, 0).await
    };
    assert!(
        tokio::time::timeout(EVENT, plain_grpc).await?.is_err(),
        "plaintext gRPC must not be served"
    );

    // A client trusting another CA refuses the coordinator.
    let other = Certs::self_signed()?;
    let wrong_ca = async {
        let c = TcClient::connect(&ClientConfig {
            tls_ca: Some(other.cert.clone()),
            ..tc.client_config()
        })
        .await?;
        begin(&c, 0).await
    };
    assert!(tokio::time::timeout(EVENT, wrong_ca).await?.is_err());
    let wrong_http = Http {
        tls_ca: Some(other.cert.clone()),
        ..http.clone()
    };
    assert!(wrong_http.get("/healthz").await.is_err());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_http_requests_get_json_errors() -> Result {
    let tc = Tc::with_config("[transactions]\nmax_timeout_ms = 100000\ndefault_timeout_ms = 60000\n").await?;
    let http = tc.http();

    for body in [
        "{not json",
        r#"{"timeout_ms": "soon"}"#,
        r#"{"timeout_ms": -1}"#,
        r#"{"timeout": 5}"#,
        r#"{"name": 5}"#,
    ] {
        let r = http.post("/v1/transactions", Some(body)).await?;
        r.assert_error(400, "invalid_argument");
    }
    let v = http
        .post("/v1/transactions", Some(r#"{"timeout_ms": 100001}"#))
        .await?
        .assert_error(400, "invalid_argument");
    assert!(v["message"].as_str().is_some_and(|m| m.contains("100000")), "{v}");
    let long = "n".repeat(257);
    http.post("/v1/transactions", Some(&format!(r#"{{"name": "{long}"}}"#)))
        .await?
        .assert_error(400, "invalid_argument");
    assert_eq!(
        http.post("/v1/transactions", Some(r#"{"timeout_ms": 100000}"#))
            .await?
            .status,
        201,
        "the maximum itself is allowed"
    );

    let v = http
        .get("/v1/transactions?status=Nope")
        .await?
        .assert_error(400, "invalid_argument");
    assert!(
        v["message"].as_str().is_some_and(|m| m.contains("Rollbacked")),
        "lists the statuses: {v}"
    );
    for query in [
        "/v1/transactions?limit=0",
        "/v1/transactions?limit=abc",
        "/v1/transactions?limit=10001",
        "/v1/transactions?bogus=1",
        "/v1/locks?limit=0",
        "/v1/locks?limit=100000",
        "/v1/locks?owner=x",
    ] {
        http.get(query).await?.assert_error(400, "invalid_argument");
    }
    // Found by fuzzing (tc_http target): an XID that percent-decodes to invalid UTF-8 got
    // axum's plain-text rejection.
    for path in ["/v1/transactions/%FF/commit", "/v1/transactions/%C3"] {
        let method = if path.ends_with("commit") { "POST" } else { "GET" };
        http.request(method, path, None)
            .await?
            .assert_error(400, "invalid_argument");
    }
    let not_found = (404, "not_found");
    // Found by fuzzing (tc_http target): a known route with the wrong method answered 405
    // with an empty body.
    let wrong_method = (405, "method_not_allowed");
    for (method, path, (status, code)) in [
        ("GET", "/v2/transactions", not_found),
        ("GET", "/", not_found),
        ("POST", "/v1/nothing", not_found),
        ("GET", "/v1/transactions/1-1/branches", wrong_method),
        ("DELETE", "/v1/transactions", wrong_method),
        ("GET", "/v1/transactions/1-1/commit", wrong_method),
        ("PUT", "/v1/locks", wrong_method),
        ("POST", "/healthz", wrong_method),
    ] {
        http.request(method, path, None).await?.assert_error(status, code);
    }
    assert_eq!(http.get("/healthz").await?.status, 200, "still serving");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_grpc_requests_are_invalid_arguments() -> Result {
    let tc = Tc::with_config("[transactions]\nmax_timeout_ms = 100000\nmax_application_data = 1024\n").await?;
    let c = tc.client().await?;

    let e =
        c.tm.clone()
            .global_begin(pb::GlobalBeginRequest {
                timeout_ms: 100_001,
                name: String::new(),
            })
            .await
            .unwrap_err();
    assert_code(&e, ErrorCode::InvalidArgument);
    let e =
        c.tm.clone()
            .global_begin(pb::GlobalBeginRequest {
                timeout_ms: 0,
                name: "x".repeat(257),
            })
            .await
            .unwrap_err();
    assert_code(&e, ErrorCode::InvalidArgument);

    let xid = begin(&c, 0).await?;
    let table = |schema: &str, table: &str, rows: Vec<pb::PrimaryKey>| {
        vec![pb::TableLocks {
            schema: schema.into(),
            table: table.into(),
            rows,
        }]
    };
    let one = || {
        vec![pb::PrimaryKey {
            values: vec![b"1".to_vec()],
        }]
    };
    for (resource, locks) in [
        ("", t_rows(&["1"])),
        ("db1", table("app", "t", vec![pb::PrimaryKey { values: vec![] }])),
        ("db1", table("", "t", one())),
        ("db1", table("app", "", one())),
    ] {
        let e = register(&c, &xid, resource, locks.clone(), 0).await.unwrap_err();
        assert_code(&e, ErrorCode::InvalidArgument);
        let e = lock_query(&c, &xid, resource, locks, 0).await.unwrap_err();
        assert_code(&e, ErrorCode::InvalidArgument);
    }
    let e =
        c.rm.clone()
            .branch_register(pb::BranchRegisterRequest {
                xid: xid.clone(),
                resource_id: "db1".into(),
                locks: t_rows(&["1"]),
                application_data: vec![0; 1025],
                lock_wait_ms: 0,
                ..Default::default()
            })
            .await
            .unwrap_err();
    assert_code(&e, ErrorCode::InvalidArgument);
    let e =
        c.rm.clone()
            .branch_register(pb::BranchRegisterRequest {
                xid: xid.clone(),
                resource_id: "db1".into(),
                branch_type: 7,
                ..Default::default()
            })
            .await
            .unwrap_err();
    assert_code(&e, ErrorCode::InvalidArgument);
    // Nothing was taken by the refused requests.
    assert!(held_locks(&tc.http(), "").await?.is_empty());
    let v = tc.http().get_json(&format!("/v1/transactions/{xid}")).await?;
    assert_eq!(v["branch_count"], 0, "{v}");
    // A register with no rows at all is a branch without locks.
    register(&c, &xid, "db1", Vec::new(), 0).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_streams_that_break_the_protocol_are_refused() -> Result {
    let tc = Tc::with_config("[phase2]\nheartbeat_interval_ms = 200\n").await?;
    let c = tc.client().await?;
    let http = tc.http();

    let e = raw_attach(&c, heartbeat()).await.err().expect("refused");
    assert_code(&e, ErrorCode::RmProtocol);
    assert!(e.message().contains("Hello"), "{e:?}");
    for resources in [&[""][..], &["db1", ""][..]] {
        let e = raw_attach(&c, hello("rm-bad", resources)).await.err().expect("refused");
        assert_code(&e, ErrorCode::RmProtocol);
    }
    let e = raw_attach(
        &c,
        pb::RmMessage {
            kind: Some(pb::rm_message::Kind::Results(pb::BranchResults {
                request_id: 1,
                outcomes: vec![],
            })),
        },
    )
    .await
    .err()
    .expect("refused");
    assert_code(&e, ErrorCode::RmProtocol);

    // No Hello at all within three heartbeat intervals.
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::RmMessage>(1);
    let Err(e) = tokio::time::timeout(
        EVENT,
        c.rm.clone().attach(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
    .await?
    else {
        panic!("an Attach stream without Hello was accepted");
    };
    assert_code(&e, ErrorCode::RmProtocol);
    drop(tx);

    // A Hello naming no resource is fine (they may follow in Announce); an empty one in an
    // Announce ends the stream.
    let mut s = raw_attach(&c, hello("rm-later", &[])).await?;
    assert!(matches!(
        s.next().await?,
        Some(pb::TcMessage {
            kind: Some(pb::tc_message::Kind::Welcome(_))
        })
    ));
    s.tx.send(pb::RmMessage {
        kind: Some(pb::rm_message::Kind::Announce(pb::Announce {
            resource_ids: vec![String::new()],
        })),
    })
    .await?;
    let e = loop {
        match s.next().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended without an error"),
            Err(e) => break e,
        }
    };
    assert_code(&e, ErrorCode::RmProtocol);

    // A second Hello on an attached stream ends it.
    let mut s = raw_attach(&c, hello("rm-twice", &["db1"])).await?;
    assert!(matches!(
        s.next().await?,
        Some(pb::TcMessage {
            kind: Some(pb::tc_message::Kind::Welcome(_))
        })
    ));
    s.tx.send(hello("rm-twice", &["db1"])).await?;
    let e = loop {
        match s.next().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended without an error"),
            Err(e) => break e,
        }
    };
    assert_code(&e, ErrorCode::RmProtocol);

    let h = http.get_json("/healthz").await?;
    assert_eq!(h["resource_managers"], 0, "{h}");
    Ok(())
}
