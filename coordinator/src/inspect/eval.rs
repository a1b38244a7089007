//! `lockstep eval`: a saved model's test loss and accuracy, computed as training's per-epoch
//! evaluation computes them (so a checkpoint gives the figures its epoch's `metrics.jsonl` line
//! holds), and its 10×10 confusion matrix, as a table on stdout and a heatmap PNG with the counts.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Result;
use clap::Args;
use lockstep_common::logging;
use lockstep_common::model::CLASSES;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::classify;
use super::draw::{self, drawing_error, FONT, GREY};
use super::source::SavedModel;

/// `lockstep eval`'s arguments.
#[derive(Args)]
pub struct EvalArgs {
    /// A run directory (its model.safetensors, or its newest checkpoint while it has not
    /// finished), a model.safetensors, or a checkpoint file (RUN_DIR/checkpoints/...).
    #[arg(value_name = "RUN_DIR|MODEL")]
    pub model: PathBuf,
    /// Folder with the MNIST files (default: the run's, if it still exists, else the download
    /// cache, ~/.cache/lockstep/mnist).
    #[arg(long, env = "LOCKSTEP_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Where to write the confusion matrix heatmap (default: confusion.png in the run
    /// directory, confusion-<checkpoint>.png for a checkpoint).
    #[arg(long, value_name = "FILE.png")]
    pub out: Option<PathBuf>,
    /// Print one JSON object instead of the lines for people.
    #[arg(long)]
    pub json: bool,
}

/// Counts of (true digit, predicted digit): rows are the truth, columns the prediction.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Confusion {
    /// `counts[true][predicted]`.
    pub counts: [[u32; CLASSES]; CLASSES],
}

impl Confusion {
    /// Counts each (label, prediction) pair.
    pub fn count(labels: &[u8], predicted: impl IntoIterator<Item = u8>) -> Self {
        let mut c = Confusion::default();
        for (&truth, guess) in labels.iter().zip(predicted) {
            c.counts[truth as usize][guess as usize] += 1;
        }
        c
    }

    /// All images counted.
    pub fn total(&self) -> u32 {
        self.counts.iter().flatten().sum()
    }

    /// Images classified correctly: the diagonal.
    pub fn correct(&self) -> u32 {
        (0..CLASSES).map(|d| self.counts[d][d]).sum()
    }

    /// Images whose true digit is `digit`.
    pub fn row_total(&self, digit: usize) -> u32 {
        self.counts[digit].iter().sum()
    }

    /// The matrix as a table for people, with each digit's share recognised.
    pub fn table(&self) -> String {
        let mut out = String::from(
            "confusion matrix: rows are the true digit, columns the prediction\n true\\pred",
        );
        for d in 0..CLASSES {
            out.push_str(&format!("{d:>6}"));
        }
        out.push_str("   right\n");
        for (truth, row) in self.counts.iter().enumerate() {
            out.push_str(&format!("{truth:>10}"));
            for count in row {
                out.push_str(&format!("{count:>6}"));
            }
            let share = row[truth] as f64 / self.row_total(truth).max(1) as f64;
            out.push_str(&format!("  {:>5.1}%\n", share * 100.0));
        }
        out
    }
}

/// Runs `lockstep eval`.
pub fn run(args: &EvalArgs) -> Result<()> {
    let model = SavedModel::open(&args.model)?;
    let test = super::test_set(args.data_dir.as_deref(), model.data_dir.as_deref())?;
    let started = Instant::now();
    let (stats, predictions) = classify::evaluate(&model, &test.images, &test.labels)?;
    let seconds = started.elapsed().as_secs_f64();
    let confusion = Confusion::count(&test.labels, predictions.iter().map(|p| p.digit));
    let samples = stats.samples.max(1) as f64;
    let (loss, accuracy) = (stats.loss_sum / samples, stats.correct as f64 / samples);
    let heatmap = args
        .out
        .clone()
        .unwrap_or_else(|| model.output_path("confusion", "png"));
    let title = format!(
        "{}: {:.2}% of {} test digits right",
        model.label(),
        accuracy * 100.0,
        thousands(stats.samples)
    );
    draw_heatmap(&heatmap, &confusion, &title, &model.model.describe())?;
    if args.json {
        let object = serde_json::json!({
            "model": model.path,
            "what": model.what,
            "network": model.model.describe(),
            "test_loss": loss,
            "test_accuracy": accuracy,
            "correct": stats.correct,
            "samples": stats.samples,
            "confusion": confusion.counts,
            "heatmap": heatmap,
            "eval_seconds": seconds,
        });
        println!("{object}");
    } else {
        println!(
            "{} ({}, {}): test loss {:.4}  test acc {:.2}% ({}/{})  {}",
            model.path.display(),
            model.what,
            model.model.describe(),
            loss,
            accuracy * 100.0,
            stats.correct,
            stats.samples,
            logging::duration(seconds)
        );
        print!("{}", confusion.table());
        println!("heatmap: {}", heatmap.display());
    }
    Ok(())
}

/// `10000` as `10,000`.
fn thousands(n: u32) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Side of a cell of the heatmap.
const CELL: i32 = 56;
/// Where the grid starts.
const GRID_X: i32 = 96;
const GRID_Y: i32 = 112;

/// Draws the confusion matrix as a heatmap with the counts: the diagonal in blue by the share
/// of its row, mistakes in red by their share relative to the largest mistake.
fn draw_heatmap(path: &Path, confusion: &Confusion, title: &str, network: &str) -> Result<()> {
    let n = CLASSES as i32;
    let size = (
        (GRID_X + n * CELL + 90) as u32,
        (GRID_Y + n * CELL + 24) as u32,
    );
    let share =
        |t: usize, p: usize| confusion.counts[t][p] as f64 / confusion.row_total(t).max(1) as f64;
    let worst = (0..CLASSES)
        .flat_map(|t| (0..CLASSES).filter(move |&p| p != t).map(move |p| (t, p)))
        .map(|(t, p)| share(t, p))
        .fold(0.0, f64::max);
    draw::png(path, size, |root| {
        let centred = |size: u32, colour: &RGBColor| {
            (FONT, size)
                .into_font()
                .color(colour)
                .pos(Pos::new(HPos::Center, VPos::Center))
        };
        let text = |s: &str, at: (i32, i32), style: &TextStyle| {
            root.draw_text(s, style, at).map_err(drawing_error)
        };
        let title_style = (FONT, 20).into_font().color(&BLACK);
        text(title, (16, 12), &title_style)?;
        text(network, (16, 40), &(FONT, 15).into_font().color(&GREY))?;
        let grid_width = n * CELL;
        text(
            "predicted digit",
            (GRID_X + grid_width / 2, GRID_Y - 42),
            &centred(16, &BLACK),
        )?;
        text(
            "true digit",
            (GRID_X - 62, GRID_Y + grid_width / 2),
            &centred(16, &BLACK).transform(FontTransform::Rotate270),
        )?;
        text(
            "right",
            (GRID_X + grid_width + 44, GRID_Y - 16),
            &centred(14, &GREY),
        )?;
        for d in 0..n {
            let middle = d * CELL + CELL / 2;
            text(
                &d.to_string(),
                (GRID_X + middle, GRID_Y - 16),
                &centred(16, &BLACK),
            )?;
            text(
                &d.to_string(),
                (GRID_X - 18, GRID_Y + middle),
                &centred(16, &BLACK),
            )?;
        }
        for t in 0..CLASSES {
            for p in 0..CLASSES {
                let count = confusion.counts[t][p];
                let (fill, strength) = if t == p {
                    (RGBColor(0x08, 0x45, 0x94), share(t, p).sqrt())
                } else if worst > 0.0 {
                    (RGBColor(0xcb, 0x18, 0x1d), (share(t, p) / worst).sqrt())
                } else {
                    (WHITE, 0.0)
                };
                let colour = blend(fill, strength);
                let x = GRID_X + p as i32 * CELL;
                let y = GRID_Y + t as i32 * CELL;
                root.draw(&Rectangle::new(
                    [(x, y), (x + CELL, y + CELL)],
                    colour.filled(),
                ))
                .map_err(drawing_error)?;
                let ink = if strength > 0.55 {
                    WHITE
                } else if count == 0 {
                    RGBColor(0xbb, 0xbb, 0xbb)
                } else {
                    BLACK
                };
                text(
                    &count.to_string(),
                    (x + CELL / 2, y + CELL / 2),
                    &centred(15, &ink),
                )?;
            }
            text(
                &format!("{:.1}%", share(t, t) * 100.0),
                (
                    GRID_X + grid_width + 44,
                    GRID_Y + t as i32 * CELL + CELL / 2,
                ),
                &centred(14, &GREY),
            )?;
        }
        root.draw(&Rectangle::new(
            [(GRID_X, GRID_Y), (GRID_X + grid_width, GRID_Y + grid_width)],
            RGBColor(0x99, 0x99, 0x99).stroke_width(1),
        ))
        .map_err(drawing_error)?;
        Ok(())
    })
}

/// `colour` laid over white with opacity `strength` (0 to 1).
fn blend(colour: RGBColor, strength: f64) -> RGBColor {
    let mix = |c: u8| (255.0 - (255.0 - c as f64) * strength.clamp(0.0, 1.0)).round() as u8;
    RGBColor(mix(colour.0), mix(colour.1), mix(colour.2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_confusion_matrix_counts_each_pair_and_its_diagonal_is_the_right_ones() {
        let labels = [0u8, 1, 1, 2, 7, 7, 7, 9];
        let predicted = [0u8, 1, 7, 2, 7, 1, 7, 4];
        let c = Confusion::count(&labels, predicted);
        assert_eq!(c.total(), 8);
        assert_eq!(c.correct(), 5);
        assert_eq!(c.counts[1][7], 1);
        assert_eq!(c.counts[7][1], 1);
        assert_eq!(c.counts[7][7], 2);
        assert_eq!(c.counts[9][4], 1);
        assert_eq!(c.row_total(7), 3);
        let table = c.table();
        assert_eq!(table.lines().count(), 2 + CLASSES);
        let seven = table.lines().nth(2 + 7).unwrap();
        assert!(seven.trim_start().starts_with("7"), "{seven}");
        assert!(seven.ends_with("66.7%"), "{seven}");
    }

    #[test]
    fn counts_are_written_with_thousands_separated() {
        assert_eq!(thousands(10_000), "10,000");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }

    #[test]
    fn the_heatmap_is_written_with_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("confusion.png");
        let labels: Vec<u8> = (0..100).map(|i| (i % 10) as u8).collect();
        let predicted: Vec<u8> = labels.iter().map(|&l| if l == 4 { 9 } else { l }).collect();
        let c = Confusion::count(&labels, predicted);
        draw_heatmap(&path, &c, "test: 90.00% right", "linear 784-10").unwrap();
        let image = image::open(&path).unwrap();
        assert_eq!(
            (image.width() as i32, image.height() as i32),
            (GRID_X + 10 * CELL + 90, GRID_Y + 10 * CELL + 24)
        );
    }
}
