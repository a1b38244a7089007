//! Property tests of what `--resume` reads from a run directory besides the checkpoints
//! themselves (their reader has its own, in `lockstep_common::checkpoint`): the checkpoint file
//! names, `metrics.jsonl`, and the epoch account a mid-epoch checkpoint carries. Whatever a
//! crash, a disk or a person left there, resuming reads it or refuses it, never panics.

use lockstep_common::checkpoint::Extras;
use lockstep_common::testing;
use proptest::collection::vec;
use proptest::prelude::*;

use super::*;
use crate::engine::EpochAccount;

fn metrics(epoch: u64) -> EpochMetrics {
    EpochMetrics {
        epoch,
        train_loss: 0.5,
        train_accuracy: 0.9,
        test_loss: 0.4,
        test_accuracy: 0.91,
        epoch_seconds: 2.0,
        samples_per_second: 100.0,
        eval_seconds: 0.5,
        workers: 2,
        membership_changes: 0,
        samples_covered: 10,
        samples_applied: 10,
        bytes_per_step: 1.0,
    }
}

/// A line of `metrics.jsonl` as a run, a crash or an editor may leave it.
fn metrics_line() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (0u64..8).prop_map(|e| serde_json::to_string(&metrics(e)).unwrap()),
        // Torn at any point, as a crash mid-write leaves the last line.
        2 => ((0u64..8), any::<prop::sample::Index>()).prop_map(|(e, cut)| {
            let line = serde_json::to_string(&metrics(e)).unwrap();
            line[..cut.index(line.len())].to_string()
        }),
        1 => Just("{\"epoch\": 18446744073709551615}".to_string()),
        1 => "[ -~]{0,40}",
        1 => ".{0,20}",
    ]
}

proptest! {
    #![proptest_config(testing::config(2048))]

    #[test]
    fn arbitrary_file_names_never_panic_the_checkpoint_name_parser(
        name in prop_oneof![
            "epoch-[0-9+-]{0,22}(-step-[0-9+-]{0,22})?\\.safetensors",
            ".{0,40}",
        ],
    ) {
        if let Some(at) = parse_checkpoint_name(&name) {
            let run = RunDir { root: PathBuf::from("/run") };
            let path = run.checkpoint_path(at);
            let again = path.file_name().and_then(|n| n.to_str()).and_then(parse_checkpoint_name);
            prop_assert_eq!(again, Some(at), "{} named {}", name, path.display());
        }
    }

    #[test]
    fn arbitrary_progress_and_coverage_reopen_an_account_or_are_refused(
        progress in proptest::option::of(prop_oneof![
            (any::<f64>(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(loss, correct, samples, steps)| {
                format!(
                    "{{\"loss_sum\":{loss},\"correct\":{correct},\"samples\":{samples},\"seconds_before\":1.5,\
                     \"membership_changes\":0,\"bytes\":0,\"steps\":{steps}}}"
                )
            }),
            ".{0,60}",
        ]),
        coverage in proptest::option::of(vec(any::<u8>(), 0..24)),
        n in 0usize..24,
    ) {
        let extras = Extras { progress: progress.clone(), coverage: coverage.clone() };
        match EpochAccount::from_extras(&extras, n) {
            Ok(account) => {
                prop_assert_eq!(account.coverage.len(), n);
                if progress.is_some() {
                    prop_assert_eq!(account.coverage, coverage.unwrap_or_else(|| vec![0; n]));
                }
            }
            Err(e) => {
                let err = format!("{e:#}");
                prop_assert!(err.contains("the checkpoint's"), "{}", err);
            }
        }
    }
}

proptest! {
    #![proptest_config(testing::config(64))]

    #[test]
    fn arbitrary_metrics_files_keep_only_whole_lines_of_finished_epochs(
        lines in vec(metrics_line(), 0..8),
        until in 0u64..8,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::create(dir.path(), "").unwrap();
        std::fs::write(dir.path().join("metrics.jsonl"), lines.join("\n")).unwrap();
        let last = run.keep_metrics_until(until).unwrap();
        let kept = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
        let epochs: Vec<u64> = kept
            .lines()
            .map(|l| serde_json::from_str::<EpochMetrics>(l).map(|m| m.epoch))
            .collect::<Result<_, _>>()
            .map_err(|e| TestCaseError::fail(format!("a kept line does not parse: {e}")))?;
        prop_assert!(epochs.windows(2).all(|w| w[0] < w[1]), "{:?}", epochs);
        prop_assert!(epochs.iter().all(|&e| e <= until), "{:?}", epochs);
        prop_assert_eq!(last.map(|m| m.epoch), epochs.last().copied());
    }
}
