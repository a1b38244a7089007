//! Property tests of configuration loading: arbitrary TOML text in a `--config` file, arbitrary
//! values for every known key (in the file, in `LOCKSTEP_…` variables and as flags), and
//! arbitrary text as the configuration a worker receives. Each gives an error or a valid
//! configuration — one that validates, that the coordinator can print, save and send, that a
//! worker parses back to the same thing, and whose model fits a state transfer — never a panic.

use proptest::collection::vec;
use proptest::prelude::*;
use toml::Value;

use super::*;
use crate::testing;

/// Every key of the job configuration, nested ones as `table.key`, and the optional ones.
fn known_keys() -> Vec<String> {
    let defaults = JobConfig::preset("mlp").expect("the default preset");
    let table = toml::Table::try_from(&defaults).expect("defaults serialise");
    let mut keys = vec!["data_dir".to_string(), "out".to_string()];
    for (key, value) in table {
        match value {
            Value::Table(inner) => keys.extend(inner.keys().map(|k| format!("{key}.{k}"))),
            _ => keys.push(key),
        }
    }
    keys
}

/// Words the configuration understands somewhere, and some it does not.
const WORDS: [&str; 19] = [
    "grpc",
    "tcp",
    "nccl",
    "mlp",
    "cnn",
    "softmax",
    "mlp-leaky",
    "mlp-sigmoid",
    "adam",
    "sgd",
    "relu",
    "gelu",
    "tanh",
    "sigmoid",
    "leaky-relu",
    "127.0.0.1:0",
    "",
    "x",
    "0",
];

/// TOML values of every kind, at and around the bounds the configuration checks.
fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        prop_oneof![
            -2i64..8,
            60i64..70,
            Just(1023),
            Just(1024),
            Just(1025),
            Just(1 << 16),
            Just((1 << 16) + 1),
            Just(1 << 20),
            Just((1 << 20) + 1),
            Just(u32::MAX as i64),
            Just(u32::MAX as i64 + 1),
            Just(i64::MAX),
            Just(i64::MIN),
            any::<i64>(),
        ]
        .prop_map(Value::Integer),
        prop_oneof![
            any::<f64>(),
            Just(f64::NAN),
            Just(f64::INFINITY),
            Just(0.0),
            Just(1.0),
            Just(1.5),
            Just(1e-3),
            Just(-0.1),
        ]
        .prop_map(Value::Float),
        any::<bool>().prop_map(Value::Boolean),
        prop::sample::select(WORDS.to_vec()).prop_map(|w| Value::String(w.to_string())),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(2, 12, 4, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(Value::Array),
            vec(("[a-z_]{1,8}", inner), 0..3).prop_map(|kv| Value::Table(kv.into_iter().collect())),
        ]
    })
}

/// A TOML table setting some known keys (and now and then an unknown one) to arbitrary values.
fn config_table() -> impl Strategy<Value = toml::Table> {
    let keys = known_keys();
    let key = prop_oneof![
        9 => prop::sample::select(keys),
        1 => "[a-z_]{1,10}(\\.[a-z_]{1,10})?",
    ];
    vec((key, value()), 0..8).prop_map(|settings| {
        let mut table = toml::Table::new();
        for (key, value) in settings {
            match key.split_once('.') {
                Some((outer, inner)) => {
                    let entry = table
                        .entry(outer.to_string())
                        .or_insert_with(|| Value::Table(toml::Table::new()));
                    if let Value::Table(t) = entry {
                        t.insert(inner.to_string(), value);
                    }
                }
                None => {
                    table.insert(key, value);
                }
            }
        }
        table
    })
}

/// Checks that a loaded configuration is one the job can run with.
fn check_valid(cfg: &JobConfig) -> Result<(), TestCaseError> {
    prop_assert!(cfg.validate().is_ok());
    let text = cfg.to_toml_string();
    let back = JobConfig::from_toml_str(&text);
    prop_assert!(
        back.is_ok(),
        "a worker cannot parse {}: {:#}",
        text,
        back.unwrap_err()
    );
    let back = back.unwrap();
    prop_assert_eq!(back.to_toml_string(), text);
    let params = crate::model::Network::new(&cfg.model).num_params();
    prop_assert!(
        params as u64 * 4 <= crate::MAX_STATE_BYTES,
        "{} parameters",
        params
    );
    Ok(())
}

/// Loads `text` as a `--config` file over the defaults.
fn load_file(text: &str, env: &[(String, String)]) -> Result<JobConfig> {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let path = dir.path().join("job.toml");
    std::fs::write(&path, text).expect("writing the config file");
    load_with_env(Some(&path), &Flags::default(), env)
}

/// TOML-like text: sections and assignments of known shapes, with numbers of any size.
fn toml_like_text() -> impl Strategy<Value = String> {
    let line = prop_oneof![
        "\\[(model|optimizer|cluster|[a-z]{1,6})\\]",
        "(epochs|batch_size|seed|workers|threads|shards|hidden|lr|kind|backend|preset|[a-z_]{1,8}) ?= ?(-?[0-9]{1,21}|[0-9]\\.[0-9]{1,3}(e-?[0-9]{1,3})?|nan|inf|true|\"[a-z:0-9.-]{0,10}\"|\\[[0-9, ]{0,24}\\])",
        ".{0,30}",
    ];
    vec(line, 0..10).prop_map(|lines| lines.join("\n"))
}

proptest! {
    #![proptest_config(testing::config(512))]

    #[test]
    fn arbitrary_toml_text_gives_an_error_or_a_valid_config(
        text in prop_oneof![toml_like_text(), ".{0,200}"],
    ) {
        if let Ok(cfg) = load_file(&text, &[]) {
            check_valid(&cfg)?;
        }
    }

    #[test]
    fn arbitrary_values_for_the_known_keys_give_an_error_or_a_valid_config(table in config_table()) {
        let text = toml::to_string(&table).expect("a table serialises");
        match load_file(&text, &[]) {
            Ok(cfg) => check_valid(&cfg)?,
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn arbitrary_environment_values_give_an_error_or_a_valid_config(
        settings in vec(
            (
                prop::sample::select(known_keys()),
                prop_oneof![
                    any::<u64>().prop_map(|n| n.to_string()),
                    any::<i64>().prop_map(|n| n.to_string()),
                    "[0-9]{1,3}(,[0-9]{1,7}){0,3}",
                    prop::sample::select(WORDS.to_vec()).prop_map(str::to_string),
                    ".{0,12}",
                ],
            ),
            0..6,
        ),
    ) {
        let env: Vec<(String, String)> = settings
            .into_iter()
            .map(|(key, value)| (format!("LOCKSTEP_{}", key.replace('.', "__").to_uppercase()), value))
            .collect();
        if let Ok(cfg) = load_with_env(None, &Flags::default(), &env) {
            check_valid(&cfg)?;
        }
    }

    #[test]
    fn arbitrary_flags_give_an_error_or_a_valid_config(
        (seed, epochs, batch_size, workers, threads) in (
            proptest::option::of(prop_oneof![any::<u64>(), Just(u64::MAX), Just(i64::MAX as u64)]),
            proptest::option::of(any::<u32>()),
            proptest::option::of(prop_oneof![0u32..300, any::<u32>()]),
            proptest::option::of(prop_oneof![0u32..5, any::<u32>()]),
            proptest::option::of(any::<u32>()),
        ),
        lr in proptest::option::of(prop_oneof![any::<f64>(), Just(f64::NAN), Just(1e-3)]),
        model in proptest::option::of(prop_oneof![
            "(mlp|linear|cnn|[a-z]{1,4})(:[0-9]{1,7}(,[0-9]{1,7}){0,3})?(:(relu|gelu|leaky-relu=[0-9.]{1,4}|[a-z]{1,4}))?",
            ".{0,16}",
        ]),
        words in vec(proptest::option::of(prop::sample::select(WORDS.to_vec())), 3),
    ) {
        // What clap would refuse (a model spec or a choice it cannot parse) never reaches the
        // layers; the rest does.
        let flags = Flags {
            seed,
            epochs,
            batch_size,
            workers,
            threads,
            model: model.and_then(|spec| ModelConfig::parse_spec(&spec).ok()),
            preset: words[0].map(str::to_string),
            backend: words[1].and_then(|w| <Backend as clap::ValueEnum>::from_str(w, false).ok()),
            optimizer: OptimizerFlags {
                kind: words[2].and_then(|w| <OptimizerKind as clap::ValueEnum>::from_str(w, false).ok()),
                lr,
            },
            ..Flags::default()
        };
        if let Ok(cfg) = load_with_env(None, &flags, &[]) {
            check_valid(&cfg)?;
        }
    }

    #[test]
    fn arbitrary_text_as_the_received_configuration_gives_an_error_or_a_valid_config(
        text in prop_oneof![
            toml_like_text(),
            config_table().prop_map(|mut t| {
                // A whole resolved configuration with some keys replaced, as a coordinator sends it.
                let defaults = toml::Table::try_from(JobConfig::preset("mlp").unwrap()).unwrap();
                for (k, v) in defaults {
                    t.entry(k).or_insert(v);
                }
                toml::to_string(&t).unwrap()
            }),
        ],
    ) {
        if let Ok(cfg) = JobConfig::from_toml_str(&text) {
            check_valid(&cfg)?;
        }
    }
}

#[test]
fn a_model_too_large_to_transfer_is_refused_naming_its_size() {
    let flags = Flags {
        model: ModelConfig::parse_spec("mlp:100000,100000").ok(),
        ..Flags::default()
    };
    let err = load_with_env(None, &flags, &[]).unwrap_err().to_string();
    assert!(
        err.contains("parameters") && err.contains("state transfer"),
        "{err}"
    );
    let flags = Flags {
        model: ModelConfig::parse_spec("mlp:50000,50000").ok(),
        ..Flags::default()
    };
    let params = crate::model::Network::new(&ModelConfig::parse_spec("mlp:50000,50000").unwrap())
        .num_params();
    let err = load_with_env(None, &flags, &[]).unwrap_err().to_string();
    assert!(err.contains(&format!("has {params} parameters")), "{err}");
    let env = [(
        "LOCKSTEP_MODEL__HIDDEN".to_string(),
        "18446744073709551615".to_string(),
    )];
    assert!(load_with_env(None, &Flags::default(), &env).is_err());
}
