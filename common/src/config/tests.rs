//! Unit tests of the configuration: the layers and their order, presets, bad input refused
//! with the reason, resuming, the model fingerprint and TLS settings.

use std::path::Path;

use super::*;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn every_preset_is_valid_and_round_trips_through_toml() {
    for p in PRESETS {
        let cfg = JobConfig::preset(p).unwrap();
        cfg.validate().unwrap();
        assert_eq!(
            JobConfig::from_toml_str(&cfg.to_toml_string()).unwrap(),
            cfg
        );
    }
    assert!(JobConfig::preset("resnet")
        .unwrap_err()
        .to_string()
        .contains("mlp-leaky"));
}

#[test]
fn layers_apply_in_order_defaults_file_env_flags() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.toml");
    std::fs::write(
        &path,
        "preset = \"softmax\"\nepochs = 4\nseed = 9\n[optimizer]\nlr = 0.5\n",
    )
    .unwrap();
    let cfg = load_with_env(Some(&path), &Flags::default(), &[]).unwrap();
    assert_eq!(cfg.preset, "softmax");
    assert_eq!(cfg.batch_size, 100, "preset default");
    assert_eq!(cfg.epochs, 4, "file");
    assert_eq!(cfg.optimizer.lr, 0.5);

    let e = env(&[
        ("LOCKSTEP_EPOCHS", "6"),
        ("LOCKSTEP_OPTIMIZER__LR", "0.25"),
        ("LOCKSTEP_MODEL__HIDDEN", "30,20"),
    ]);
    let cfg = load_with_env(Some(&path), &Flags::default(), &e).unwrap();
    assert_eq!(cfg.epochs, 6, "env beats file");
    assert_eq!(cfg.optimizer.lr, 0.25);
    assert_eq!(cfg.model.hidden, vec![30, 20]);
    assert_eq!(cfg.seed, 9);

    let flags = Flags {
        epochs: Some(2),
        model: Some(ModelConfig::parse_spec("mlp:64:gelu").unwrap()),
        ..Default::default()
    };
    let cfg = load_with_env(Some(&path), &flags, &e).unwrap();
    assert_eq!(cfg.epochs, 2, "flags beat env");
    assert_eq!(cfg.model.hidden, vec![64]);
    assert_eq!(cfg.model.activation, Activation::Gelu);
}

#[test]
fn the_preset_flag_picks_the_defaults() {
    let flags = Flags {
        preset: Some("cnn".into()),
        ..Default::default()
    };
    let cfg = load_with_env(None, &flags, &[]).unwrap();
    assert_eq!(cfg.model.kind, ModelKind::Cnn);
    let cfg = load_with_env(None, &Flags::default(), &[]).unwrap();
    assert_eq!(cfg.preset, "mlp");
    assert_eq!(cfg.model.hidden, vec![100, 100]);
}

#[test]
fn bad_input_is_refused_with_the_reason() {
    let err = load_with_env(
        None,
        &Flags {
            preset: Some("nope".into()),
            ..Default::default()
        },
        &[],
    )
    .unwrap_err();
    assert!(err.to_string().contains("unknown preset `nope`"), "{err}");

    let flags = Flags {
        batch_size: Some(2),
        workers: Some(3),
        ..Default::default()
    };
    let err = load_with_env(None, &flags, &[]).unwrap_err();
    assert!(
        err.to_string().contains("smaller than the worker count"),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.toml");
    std::fs::write(&path, "[optimiser]\nlr = 1\n").unwrap();
    let err = format!(
        "{:#}",
        load_with_env(Some(&path), &Flags::default(), &[]).unwrap_err()
    );
    assert!(
        err.contains("unknown field `optimiser`, expected one of") && err.contains("`optimizer`"),
        "{err}"
    );

    assert!(ModelConfig::parse_spec("mlp:10,x").is_err());
    assert!(ModelConfig::parse_spec("transformer").is_err());
}

#[test]
fn model_specs_parse() {
    let m = ModelConfig::parse_spec("mlp:64:leaky-relu=0.2").unwrap();
    assert_eq!(m.hidden, vec![64]);
    assert_eq!(m.activation, Activation::LeakyRelu);
    assert_eq!(m.leaky_slope, 0.2);
    assert_eq!(ModelConfig::parse_spec("cnn").unwrap().kind, ModelKind::Cnn);
    assert!(ModelConfig::parse_spec("linear").unwrap().hidden.is_empty());
}

#[test]
fn shards_and_worker_bounds_default_to_the_starting_worker_count() {
    let flags = Flags {
        workers: Some(3),
        ..Default::default()
    };
    let mut cfg = load_with_env(None, &flags, &[]).unwrap();
    assert_eq!((cfg.cluster.shards, cfg.shards()), (0, 3));
    cfg.resolve();
    assert_eq!((cfg.cluster.shards, cfg.max_workers()), (3, 3));
    assert_eq!(cfg.cluster.min_workers, 1);

    let e = env(&[("LOCKSTEP_CLUSTER__SHARDS", "2")]);
    let err = load_with_env(None, &flags, &e).unwrap_err().to_string();
    assert!(err.contains("only 2 shards"), "{err}");
    let e = env(&[("LOCKSTEP_CLUSTER__MIN_WORKERS", "4")]);
    let err = load_with_env(None, &flags, &e).unwrap_err().to_string();
    assert!(err.contains("cluster.min_workers"), "{err}");
    let e = env(&[
        ("LOCKSTEP_CLUSTER__SHARDS", "100"),
        ("LOCKSTEP_BATCH_SIZE", "64"),
    ]);
    let err = load_with_env(None, &flags, &e).unwrap_err().to_string();
    assert!(err.contains("smaller than cluster.shards (100)"), "{err}");
}

#[test]
fn a_resumed_configuration_may_change_workers_but_not_the_arithmetic() {
    let mut run = JobConfig::preset("mlp").unwrap();
    run.resolve();
    let mut other = run.clone();
    other.workers = 1;
    other.epochs = 5;
    other.backend = Backend::Tcp;
    other.cluster.heartbeat_timeout_ms = 9000;
    assert!(run.resume_conflicts(&other).is_empty());

    other.seed = 7;
    other.optimizer.lr = 0.5;
    other.cluster.shards = 4;
    let conflicts = run.resume_conflicts(&other);
    assert_eq!(conflicts.len(), 3, "{conflicts:?}");
    assert!(
        conflicts.iter().any(|c| c == "seed: the run has 42, now 7"),
        "{conflicts:?}"
    );
    assert!(
        conflicts.iter().any(|c| c.starts_with("optimizer.lr:")),
        "{conflicts:?}"
    );
    assert!(
        conflicts.iter().any(|c| c.starts_with("cluster.shards:")),
        "{conflicts:?}"
    );

    // Layered over the run's configuration, a flag-less resume is the run itself, and a
    // --preset flag brings that preset's model (which then conflicts).
    let resumed = Layers::with_env(None, &Flags::default(), &[])
        .and_then(|l| l.resolve(Deployment::Local, Some(&run)))
        .unwrap();
    assert_eq!(resumed, run);
    let flags = Flags {
        preset: Some("cnn".into()),
        ..Default::default()
    };
    let resumed = Layers::with_env(None, &flags, &[])
        .and_then(|l| l.resolve(Deployment::Local, Some(&run)))
        .unwrap();
    assert!(run
        .resume_conflicts(&resumed)
        .iter()
        .any(|c| c.starts_with("model.kind")));
}

#[test]
fn fingerprint_follows_the_model_only() {
    let a = JobConfig::preset("mlp").unwrap();
    let mut b = a.clone();
    b.epochs = 9;
    assert_eq!(a.model_fingerprint(), b.model_fingerprint());
    b.model.hidden = vec![100, 101];
    assert_ne!(a.model_fingerprint(), b.model_fingerprint());
}

#[test]
fn tls_files_layer_like_every_setting_and_must_come_in_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    std::fs::write(&file, "[tls]\ncert = \"file.pem\"\nkey = \"file.key\"\n").unwrap();
    let env = env(&[
        ("LOCKSTEP_TLS__KEY", "env.key"),
        ("LOCKSTEP_TLS__CA", "ca.pem"),
    ]);
    let flags = Flags {
        tls: TlsConfig {
            cert: Some("flag.pem".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let cfg = load_with_env(Some(&file), &flags, &env).unwrap();
    assert_eq!(cfg.tls.cert.as_deref(), Some(Path::new("flag.pem")));
    assert_eq!(cfg.tls.key.as_deref(), Some(Path::new("env.key")));
    assert_eq!(cfg.tls.ca.as_deref(), Some(Path::new("ca.pem")));
    assert!(cfg.tls.enabled());
    // Saved and sent as it was resolved; no [tls] at all without TLS.
    assert_eq!(
        JobConfig::from_toml_str(&cfg.to_toml_string()).unwrap(),
        cfg
    );
    let plain = load_with_env(None, &Flags::default(), &[]).unwrap();
    assert!(!plain.to_toml_string().contains("[tls]"));
    // A resume may turn TLS on or off: it does not change what is computed.
    assert!(plain.resume_conflicts(&cfg).is_empty());

    let half = env_pairs_error(&[("LOCKSTEP_TLS__CERT", "x.pem")]);
    assert!(half.contains("tls.cert and tls.key go together"), "{half}");
    let orphan = env_pairs_error(&[("LOCKSTEP_TLS__CLIENT_CA", "ca.pem")]);
    assert!(orphan.contains("need tls.cert and tls.key"), "{orphan}");
    std::fs::write(&file, "[tls]\ncertificate = \"x\"\n").unwrap();
    let e = format!(
        "{:#}",
        load_with_env(Some(&file), &Flags::default(), &[]).unwrap_err()
    );
    assert!(
        e.contains("unknown field `certificate`") && e.contains("for key `tls`"),
        "{e}"
    );
}

#[test]
fn only_lockstep_variables_that_name_a_setting_are_a_layer() {
    // The prefix is shared with settings that are not the job's (the token, the MNIST cache, a
    // deployment's own): those are left alone. Inside a section, a typo is refused.
    let e = env(&[
        ("LOCKSTEP_CACHE_DIR", "/tmp/mnist"),
        ("LOCKSTEP_TOKEN", "t0ken"),
        ("LOCKSTEP_EPOCHS", "5"),
    ]);
    assert_eq!(
        load_with_env(None, &Flags::default(), &e).unwrap().epochs,
        5
    );
    let typo = env_pairs_error(&[("LOCKSTEP_OPTIMIZER__LRR", "0.1")]);
    assert!(
        typo.contains("unknown field `lrr`") && typo.contains("for key `optimizer`"),
        "{typo}"
    );
}

#[test]
fn a_setting_counts_as_given_in_any_layer_but_not_from_the_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.toml");
    std::fs::write(&path, "workers = 3\n[cluster]\nshards = 6\n").unwrap();
    let from_file = Layers::with_env(Some(&path), &Flags::default(), &[]).unwrap();
    assert!(from_file.sets("workers") && from_file.sets("cluster.shards"));
    let from_env = Layers::with_env(None, &Flags::default(), &env(&[("LOCKSTEP_WORKERS", "3")]));
    assert!(from_env.unwrap().sets("workers"));
    let flags = Flags {
        workers: Some(3),
        ..Default::default()
    };
    assert!(Layers::with_env(None, &flags, &[]).unwrap().sets("workers"));
    let none = Layers::with_env(None, &Flags::default(), &[]).unwrap();
    assert!(!none.sets("workers"));
    assert_eq!(none.resolve(Deployment::Local, None).unwrap().workers, 2);
}

#[test]
fn local_workers_default_to_tcp_external_ones_to_grpc_and_a_resume_keeps_the_runs_backend() {
    let backend = |layers: &Layers, deployment, run: Option<&JobConfig>| {
        layers.resolve(deployment, run).unwrap().backend
    };
    let none = Layers::with_env(None, &Flags::default(), &[]).unwrap();
    assert_eq!(backend(&none, Deployment::Local, None), Backend::Tcp);
    assert_eq!(backend(&none, Deployment::External, None), Backend::Grpc);
    let flags = Flags {
        backend: Some(Backend::Grpc),
        ..Default::default()
    };
    let flag = Layers::with_env(None, &flags, &[]).unwrap();
    assert_eq!(backend(&flag, Deployment::Local, None), Backend::Grpc);
    let variable = env(&[("LOCKSTEP_BACKEND", "tcp")]);
    let variable = Layers::with_env(None, &Flags::default(), &variable).unwrap();
    assert_eq!(backend(&variable, Deployment::External, None), Backend::Tcp);

    // A run from before tcp was the local default saved `backend = "grpc"`: it resumes with
    // grpc, and says so in the configuration it saves again.
    let mut old = JobConfig::preset("mlp").unwrap();
    old.backend = Backend::Grpc;
    let old = JobConfig::from_toml_str(&old.to_toml_string()).unwrap();
    let resumed = none.resolve(Deployment::Local, Some(&old)).unwrap();
    assert_eq!(resumed.backend, Backend::Grpc);
    assert!(resumed.to_toml_string().contains("backend = \"grpc\""));
    let tcp = Flags {
        backend: Some(Backend::Tcp),
        ..Default::default()
    };
    let tcp = Layers::with_env(None, &tcp, &[]).unwrap();
    let switched = tcp.resolve(Deployment::Local, Some(&old)).unwrap();
    assert_eq!(switched.backend, Backend::Tcp);
    assert!(old.resume_conflicts(&switched).is_empty());
}

fn env_pairs_error(pairs: &[(&str, &str)]) -> String {
    format!(
        "{:#}",
        load_with_env(None, &Flags::default(), &env(pairs)).unwrap_err()
    )
}

#[test]
fn addresses_default_by_deployment_and_a_given_one_is_kept() {
    let resolve = |flags: &Flags, deployment, run: Option<&JobConfig>| {
        Layers::with_env(None, flags, &[])
            .and_then(|l| l.resolve(deployment, run))
            .unwrap()
    };
    let none = Flags::default();
    let local = resolve(&none, Deployment::Local, None);
    assert_eq!(
        (local.listen.as_str(), local.metrics_addr.as_str()),
        ("127.0.0.1:0", "127.0.0.1:0")
    );
    let external = resolve(&none, Deployment::External, None);
    assert_eq!(
        (external.listen.as_str(), external.metrics_addr.as_str()),
        ("0.0.0.0:50051", "0.0.0.0:9090")
    );
    // Given, even equal to the local default, it stays (it was replaced after loading).
    let given = Flags {
        listen: Some("127.0.0.1:0".into()),
        metrics_addr: Some("off".into()),
        ..Default::default()
    };
    let external = resolve(&given, Deployment::External, None);
    assert_eq!(
        (external.listen.as_str(), external.metrics_addr.as_str()),
        ("127.0.0.1:0", "off")
    );

    // A resumed local run resumed with external workers listens as external ones do, and
    // back; an address the run was given stays.
    let resumed = resolve(&none, Deployment::External, Some(&local));
    assert_eq!(resumed.listen, "0.0.0.0:50051");
    assert_eq!(resumed.metrics_addr, "0.0.0.0:9090");
    let back = resolve(&none, Deployment::Local, Some(&resumed));
    assert_eq!(
        (back.listen.as_str(), back.metrics_addr.as_str()),
        ("127.0.0.1:0", "127.0.0.1:0")
    );
    let mut own = local.clone();
    own.listen = "10.0.0.5:7000".into();
    assert_eq!(
        resolve(&none, Deployment::External, Some(&own)).listen,
        "10.0.0.5:7000"
    );
    assert!(local.resume_conflicts(&resumed).is_empty());
}
