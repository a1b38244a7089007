//! `lockstep eval`, `predict` and `plot` on real runs: a tiny run is trained with the real
//! binaries, then eval must give the figures the run itself reported (final model and a
//! mid-training checkpoint) with a confusion matrix of the whole test set, predict must draw
//! and count what it prints and read a person's pictures (exported, inverted, enlarged, JPEG),
//! plot must overlay two runs in PNG and SVG, and bad input must be refused naming the path.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use lockstep_common::mnist::TestSet;
use lockstep_tests::*;
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(120);

/// Trains a two-epoch run on 6,000 training images with one worker: seconds.
fn tiny_run(dir: &Path, name: &str, model: &[&str]) -> PathBuf {
    let run = dir.join(name);
    run_ok(
        train_command(&run)
            .args(["--epochs", "2", "--workers", "1"])
            .args(model)
            .env("LOCKSTEP_TRAIN_SAMPLES", "6000"),
        LIMIT,
        &format!("training {name}"),
    );
    run
}

/// `lockstep ARGS` with the test data, run to its end.
fn lockstep_with(args: &[&str]) -> Output {
    run_with_limit(
        Command::new(lockstep())
            .args(args)
            .env("LOCKSTEP_DATA_DIR", data_dir())
            .stdin(Stdio::null()),
        LIMIT,
    )
}

/// `lockstep ARGS`, which must succeed; its standard output and error.
fn lockstep_ok(args: &[&str]) -> (String, String) {
    let out = lockstep_with(args);
    let err = stderr_of(&out);
    assert!(out.status.success(), "lockstep {args:?} failed:\n{err}");
    (String::from_utf8_lossy(&out.stdout).into_owned(), err)
}

/// The JSON object `lockstep ARGS --json` prints.
fn json_of(args: &[&str]) -> (Value, String) {
    let mut args = args.to_vec();
    args.push("--json");
    let (out, err) = lockstep_ok(&args);
    (
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}")),
        err,
    )
}

fn s(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

fn png_size(path: &Path) -> (u32, u32) {
    let image = image::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (image.width(), image.height())
}

#[test]
fn eval_gives_the_runs_own_figures_and_a_confusion_matrix_of_the_whole_test_set() {
    let dir = tempfile::tempdir().unwrap();
    let run = tiny_run(dir.path(), "softmax", &["--preset", "softmax"]);
    let metrics = metrics(&run);
    assert_eq!(metrics.len(), 2);

    // The final model: the last epoch's figures, exactly (same batches, same sums).
    let (eval, err) = json_of(&["eval", s(&run)]);
    assert!(err.contains("model.safetensors"), "says which file: {err}");
    assert_eq!(eval["test_accuracy"], metrics[1]["test_accuracy"]);
    assert_eq!(eval["test_loss"], metrics[1]["test_loss"]);
    let confusion: Vec<Vec<u64>> = serde_json::from_value(eval["confusion"].clone()).unwrap();
    assert_eq!(confusion.len(), 10);
    let total: u64 = confusion.iter().flatten().sum();
    let diagonal: u64 = (0..10).map(|d| confusion[d][d]).sum();
    assert_eq!(total, 10_000);
    assert_eq!(diagonal, eval["correct"].as_u64().unwrap());
    assert_eq!(
        diagonal as f64 / 10_000.0,
        eval["test_accuracy"].as_f64().unwrap()
    );
    let labels = TestSet::load_or_download(Some(&data_dir())).unwrap().labels;
    for (digit, row) in confusion.iter().enumerate() {
        let expected = labels.iter().filter(|&&l| l as usize == digit).count();
        assert_eq!(row.iter().sum::<u64>() as usize, expected, "row {digit}");
    }
    assert_eq!(png_size(&run.join("confusion.png")), (746, 696));

    // For people: one line with the figures as training printed them, then the table.
    let (out, _) = lockstep_ok(&["eval", s(&run)]);
    let first = out.lines().next().unwrap();
    let accuracy = metrics[1]["test_accuracy"].as_f64().unwrap() * 100.0;
    assert!(first.contains(&format!("test acc {accuracy:.2}%")), "{out}");
    assert!(out.contains("true\\pred"), "{out}");
    assert!(out.contains("confusion.png"), "{out}");

    // A checkpoint from the middle of the run: epoch 1's figures.
    let checkpoint = run.join("checkpoints/epoch-0001.safetensors");
    let (mid, _) = json_of(&["eval", s(&checkpoint)]);
    assert_eq!(mid["test_accuracy"], metrics[0]["test_accuracy"]);
    assert_eq!(mid["test_loss"], metrics[0]["test_loss"]);
    assert!(run.join("confusion-epoch-0001.png").exists());

    // A run that has not finished stands for its newest checkpoint, and says so.
    std::fs::remove_file(run.join("model.safetensors")).unwrap();
    let (unfinished, err) = json_of(&["eval", s(&run)]);
    assert!(
        err.contains("not finished") && err.contains("epoch-0002.safetensors"),
        "{err}"
    );
    assert_eq!(unfinished["test_accuracy"], metrics[1]["test_accuracy"]);
}

#[test]
fn predict_draws_a_grid_of_test_digits_and_reads_a_persons_own_pictures() {
    let dir = tempfile::tempdir().unwrap();
    let run = tiny_run(dir.path(), "mlp", &["--preset", "mlp"]);

    // 16 test digits: 16 lines, the count of right ones agrees with them, a grid of 8 × 2.
    let (out, _) = lockstep_ok(&["predict", s(&run), "--images", "16"]);
    let lines: Vec<&str> = out.lines().filter(|l| l.contains("predicted")).collect();
    assert_eq!(lines.len(), 16, "{out}");
    let wrong = lines.iter().filter(|l| l.contains("WRONG")).count();
    for line in &lines {
        let word = |w: &str| line.split(w).nth(1).and_then(|r| r.trim().chars().next());
        assert_eq!(
            line.contains("WRONG"),
            word("predicted") != word("true"),
            "{line}"
        );
    }
    assert!(
        out.contains(&format!("{}/16 right", 16 - wrong)),
        "{wrong} wrong:\n{out}"
    );
    assert_eq!(png_size(&run.join("predictions.png")), (848, 316));

    // The same through JSON, with the probabilities, to compare pictures against.
    let (grid, _) = json_of(&["predict", s(&run), "--images", "16"]);
    let predictions = grid["predictions"].as_array().unwrap();
    let right = predictions
        .iter()
        .filter(|p| p["predicted"] == p["label"])
        .count();
    assert_eq!(right, 16 - wrong);
    assert_eq!(grid["correct"].as_u64().unwrap() as usize, right);
    let (index, best) = predictions
        .iter()
        .enumerate()
        .filter(|(_, p)| p["predicted"] == p["label"])
        .max_by(|a, b| {
            let p = |v: &Value| v["probability"].as_f64().unwrap();
            p(a.1).total_cmp(&p(b.1))
        })
        .expect("a right prediction among 16");

    // That digit exported as a 28×28 PNG is the same input: the same prediction.
    let test = TestSet::load_or_download(Some(&data_dir())).unwrap();
    let pixels = test.image(index).to_vec();
    let exported = dir.path().join("digit.png");
    image::GrayImage::from_raw(28, 28, pixels.clone())
        .unwrap()
        .save(&exported)
        .unwrap();
    // Drawn the other way round (black on white) and four times larger, as PNG and JPEG.
    let big = image::GrayImage::from_fn(112, 112, |x, y| {
        image::Luma([255 - pixels[(y / 4 * 28 + x / 4) as usize]])
    });
    let inverted = dir.path().join("inverted-large.png");
    big.save(&inverted).unwrap();
    let jpeg = dir.path().join("inverted-large.jpg");
    big.save(&jpeg).unwrap();
    let (own, err) = json_of(&[
        "predict",
        s(&run),
        "--image",
        s(&exported),
        "--image",
        s(&inverted),
        "--image",
        s(&jpeg),
    ]);
    let own = own["predictions"].as_array().unwrap().clone();
    assert_eq!(own.len(), 3);
    assert_eq!(own[0]["predicted"], best["predicted"]);
    let close = |a: &Value, b: &Value| (a.as_f64().unwrap() - b.as_f64().unwrap()).abs() < 1e-5;
    assert!(
        close(&own[0]["probability"], &best["probability"]),
        "{own:?} vs {best}"
    );
    assert_eq!(own[0]["label"], Value::Null);
    for p in &own[1..] {
        assert_eq!(p["predicted"], best["predicted"], "{p}");
        let notes = p["notes"].to_string();
        assert!(
            notes.contains("inverted") && notes.contains("112×112"),
            "{notes}"
        );
    }
    assert!(err.contains("inverted"), "says it inverted: {err}");
    assert_eq!(
        png_size(&run.join("predictions-own.png")),
        (2 * 8 + 3 * 104, 40 + 134 + 8)
    );
    assert_eq!(
        png_size(&run.join("predictions.png")),
        (848, 316),
        "the test digits' grid is kept"
    );
}

/// Writes `model` again without its metadata: a model.safetensors from before it named its
/// network.
fn strip_metadata(model: &Path, to: &Path) {
    let bytes = std::fs::read(model).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let tensors: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n.to_string(), t))
        .collect();
    std::fs::write(to, safetensors::serialize(tensors, None).unwrap()).unwrap();
}

#[test]
fn plot_overlays_two_runs_and_bad_input_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let softmax = tiny_run(dir.path(), "softmax-run", &["--preset", "softmax"]);
    let mlp = tiny_run(dir.path(), "mlp16-run", &["--model", "mlp:16"]);

    let out_dir = dir.path().join("curves");
    let (out, _) = lockstep_ok(&["plot", s(&softmax), s(&mlp), "--out", s(&out_dir)]);
    assert!(out.contains("softmax-run: 2 epoch(s)"), "{out}");
    assert_eq!(png_size(&out_dir.join("learning-curves.png")), (1200, 520));
    let svg = std::fs::read_to_string(out_dir.join("learning-curves.svg")).unwrap();
    assert!(svg.starts_with("<svg"), "{}", &svg[..100.min(svg.len())]);
    assert!(svg.contains("softmax-run") && svg.contains("mlp16-run"));
    lockstep_ok(&["plot", s(&mlp)]);
    assert!(
        mlp.join("learning-curves.png").exists(),
        "by default into the run"
    );

    // A path that does not exist.
    let missing = dir.path().join("no-such-run");
    assert_clean_failure(&lockstep_with(&["eval", s(&missing)]), &[s(&missing)]);
    // A folder without a model, and without metrics for plot.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert_clean_failure(
        &lockstep_with(&["eval", s(&empty)]),
        &[s(&empty), "holds no model"],
    );
    assert_clean_failure(
        &lockstep_with(&["plot", s(&softmax), s(&empty)]),
        &[s(&empty), "metrics.jsonl"],
    );
    // A model whose tensors are not the network its run's config.toml describes.
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    strip_metadata(
        &mlp.join("model.safetensors"),
        &other.join("model.safetensors"),
    );
    let config = std::fs::read_to_string(mlp.join("config.toml")).unwrap();
    assert!(config.contains("hidden = [16]"), "{config}");
    std::fs::write(
        other.join("config.toml"),
        config.replace("hidden = [16]", "hidden = [32]"),
    )
    .unwrap();
    assert_clean_failure(
        &lockstep_with(&["predict", s(&other)]),
        &[
            s(&other.join("model.safetensors")),
            "fc1.weight",
            "[16, 784]",
            "[32, 784]",
            "another model",
        ],
    );
    // Without metadata and beside its own config.toml, the same file is read.
    std::fs::write(other.join("config.toml"), &config).unwrap();
    lockstep_ok(&["eval", s(&other)]);
    // Not a model at all.
    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "epoch,loss\n1,0.5\n").unwrap();
    assert_clean_failure(&lockstep_with(&["eval", s(&text)]), &[s(&text)]);
    // Pictures that are not pictures, or not there.
    assert_clean_failure(
        &lockstep_with(&["predict", s(&softmax), "--image", s(&text)]),
        &[s(&text), "PNG or JPEG"],
    );
    let absent = dir.path().join("absent.png");
    assert_clean_failure(
        &lockstep_with(&["predict", s(&softmax), "--image", s(&absent)]),
        &[s(&absent)],
    );
}
