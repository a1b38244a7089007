//! `lockstep plot`: learning curves, loss and accuracy against the epoch, of one run or of
//! several overlaid (one colour per run, named in the legend), from each run's
//! `metrics.jsonl`, written as `learning-curves.png` and `learning-curves.svg`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::Args;
use plotters::coord::Shift;
use plotters::prelude::*;

use super::draw::{self, drawing_error, FONT, GREY, RUN_COLOURS};
use crate::run_dir::{EpochMetrics, RunDir};

/// `lockstep plot`'s arguments.
#[derive(Args)]
pub struct PlotArgs {
    /// Run directories whose metrics.jsonl to draw, overlaid (a run still training is drawn as
    /// far as it got).
    #[arg(value_name = "RUN_DIR", required = true)]
    pub runs: Vec<PathBuf>,
    /// Folder to write learning-curves.png and learning-curves.svg into (default: the first run
    /// directory).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

/// One run's curves.
#[derive(Clone, Debug, PartialEq)]
pub struct Curves {
    /// The run's name in the legend.
    pub name: String,
    /// `(epoch, value)` points.
    pub train_loss: Vec<(f64, f64)>,
    /// Test loss after each epoch.
    pub test_loss: Vec<(f64, f64)>,
    /// Training accuracy, percent.
    pub train_accuracy: Vec<(f64, f64)>,
    /// Test accuracy, percent.
    pub test_accuracy: Vec<(f64, f64)>,
}

impl Curves {
    /// The curves of a run's epochs.
    pub fn of(name: String, epochs: &[EpochMetrics]) -> Self {
        let points = |value: fn(&EpochMetrics) -> f64| {
            epochs
                .iter()
                .map(|m| (m.epoch as f64, value(m)))
                .collect::<Vec<_>>()
        };
        Curves {
            name,
            train_loss: points(|m| m.train_loss),
            test_loss: points(|m| m.test_loss),
            train_accuracy: points(|m| m.train_accuracy * 100.0),
            test_accuracy: points(|m| m.test_accuracy * 100.0),
        }
    }

    fn last_epoch(&self) -> f64 {
        self.test_loss.last().map_or(0.0, |p| p.0)
    }
}

/// Runs `lockstep plot`.
pub fn run(args: &PlotArgs) -> Result<()> {
    let names = legend_names(&args.runs);
    let mut runs = Vec::with_capacity(args.runs.len());
    for (dir, name) in args.runs.iter().zip(names) {
        let metrics = dir.join("metrics.jsonl");
        if !metrics.is_file() {
            bail!(
                "{} has no metrics.jsonl: is it a Lockstep run directory? (`lockstep train --out \
                 DIR` writes one line per epoch there)",
                dir.display()
            );
        }
        let epochs = RunDir::metrics_of(dir)?;
        if epochs.is_empty() {
            bail!(
                "{} holds no finished epoch yet; plot it after its first epoch",
                metrics.display()
            );
        }
        let best = epochs
            .iter()
            .max_by(|a, b| a.test_accuracy.total_cmp(&b.test_accuracy))
            .map(|m| (m.epoch, m.test_accuracy));
        if let Some((epoch, accuracy)) = best {
            println!(
                "{name}: {} epoch(s), best test acc {:.2}% (epoch {epoch}), last test loss {:.4}",
                epochs.len(),
                accuracy * 100.0,
                epochs.last().map_or(0.0, |m| m.test_loss)
            );
        }
        runs.push(Curves::of(name, &epochs));
    }
    let folder = args.out.clone().unwrap_or_else(|| args.runs[0].clone());
    std::fs::create_dir_all(&folder)
        .map_err(|e| anyhow::anyhow!("creating {}: {e}", folder.display()))?;
    let png = folder.join("learning-curves.png");
    let svg = folder.join("learning-curves.svg");
    draw::png(&png, SIZE, |root| draw_curves(&root, &runs))?;
    draw::svg(&svg, SIZE, |root| draw_curves(&root, &runs))?;
    println!("wrote {}", png.display());
    println!("wrote {}", svg.display());
    Ok(())
}

/// The picture's size.
pub const SIZE: (u32, u32) = (1200, 520);

/// Names for the legend: each run directory's own name, or its whole path where two names
/// would be the same.
fn legend_names(runs: &[PathBuf]) -> Vec<String> {
    let short = |p: &Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| p.display().to_string())
    };
    runs.iter()
        .map(|p| {
            let name = short(p);
            if runs.iter().filter(|q| short(q) == name).count() > 1 {
                p.display().to_string()
            } else {
                name
            }
        })
        .collect()
}

/// Draws the loss panel and the accuracy panel side by side (on a white canvas).
fn draw_curves<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, runs: &[Curves]) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let (top, body) = root.split_vertically(44);
    top.draw_text(
        "learning curves: solid = test set after each epoch, dashed = training (mean over the epoch)",
        &(FONT, 17).into_font().color(&GREY),
        (16, 14),
    )
    .map_err(drawing_error)?;
    let (left, right) = body.split_horizontally(SIZE.0 / 2);
    let epochs = runs.iter().map(Curves::last_epoch).fold(1.0, f64::max);
    let loss_top = runs
        .iter()
        .flat_map(|r| r.train_loss.iter().chain(&r.test_loss))
        .map(|p| p.1)
        .fold(0.0, f64::max);
    panel(
        &left,
        runs,
        ("loss", "cross-entropy"),
        (0.0, nice_top(loss_top)),
        epochs,
        |r| (&r.train_loss, &r.test_loss),
        false,
    )?;
    let accuracies: Vec<f64> = runs
        .iter()
        .flat_map(|r| r.train_accuracy.iter().chain(&r.test_accuracy))
        .map(|p| p.1)
        .collect();
    let low = accuracies.iter().copied().fold(100.0, f64::min);
    let high = accuracies.iter().copied().fold(0.0, f64::max);
    let margin = ((high - low) * 0.1).max(0.5);
    panel(
        &right,
        runs,
        ("accuracy", "percent right"),
        (
            (low - margin).floor().max(0.0),
            (high + margin).ceil().min(100.0),
        ),
        epochs,
        |r| (&r.train_accuracy, &r.test_accuracy),
        true,
    )?;
    Ok(())
}

/// One panel: each run's training curve dashed and its test curve solid, with points.
fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    runs: &[Curves],
    (title, y_axis): (&str, &str),
    (y_low, y_high): (f64, f64),
    epochs: f64,
    series: impl Fn(&Curves) -> (&Vec<(f64, f64)>, &Vec<(f64, f64)>),
    legend: bool,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FONT, 20))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(0.5..epochs + 0.5, y_low..y_high)
        .map_err(drawing_error)?;
    let whole_epochs = |x: &f64| {
        if (x - x.round()).abs() < 1e-6 && *x >= 1.0 {
            format!("{}", x.round())
        } else {
            String::new()
        }
    };
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc(y_axis)
        .x_labels((epochs as usize * 2 + 1).min(41))
        .x_label_formatter(&whole_epochs)
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 17))
        .light_line_style(RGBColor(0xee, 0xee, 0xee))
        .draw()
        .map_err(drawing_error)?;
    for (i, run) in runs.iter().enumerate() {
        let colour = RUN_COLOURS[i % RUN_COLOURS.len()];
        let (train, test) = series(run);
        chart
            .draw_series(DashedLineSeries::new(
                train.iter().copied(),
                8,
                5,
                colour.stroke_width(2),
            ))
            .map_err(drawing_error)?;
        chart
            .draw_series(LineSeries::new(
                test.iter().copied(),
                colour.stroke_width(3),
            ))
            .map_err(drawing_error)?
            .label(run.name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], colour.stroke_width(3))
            });
        chart
            .draw_series(
                test.iter()
                    .map(|&p| Circle::new(p, 4, colour.filled()))
                    .chain(
                        train
                            .iter()
                            .map(|&p| Circle::new(p, 3, colour.stroke_width(1))),
                    ),
            )
            .map_err(drawing_error)?;
    }
    if legend {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .label_font((FONT, 15))
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(0xbb, 0xbb, 0xbb))
            .draw()
            .map_err(drawing_error)?;
    }
    Ok(())
}

/// A round upper bound just above `value`, for an axis.
fn nice_top(value: f64) -> f64 {
    if value <= 0.0 || !value.is_finite() {
        return 1.0;
    }
    let step = 10f64.powf((value * 1.1).log10().floor()) / 2.0;
    ((value * 1.1) / step).ceil() * step
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics(epoch: u64, test_accuracy: f64) -> EpochMetrics {
        EpochMetrics {
            epoch,
            train_loss: 1.0 / epoch as f64,
            train_accuracy: test_accuracy - 0.01,
            test_loss: 0.5 / epoch as f64,
            test_accuracy,
            ..EpochMetrics::default()
        }
    }

    #[test]
    fn a_runs_metrics_become_its_curves_in_percent() {
        let c = Curves::of("a".into(), &[metrics(1, 0.9), metrics(2, 0.95)]);
        assert_eq!(c.test_accuracy, vec![(1.0, 90.0), (2.0, 95.0)]);
        assert_eq!(c.train_loss, vec![(1.0, 1.0), (2.0, 0.5)]);
        assert_eq!(c.last_epoch(), 2.0);
    }

    #[test]
    fn metrics_are_read_skipping_a_torn_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let lines: Vec<String> = [metrics(1, 0.9), metrics(2, 0.95)]
            .iter()
            .map(|m| serde_json::to_string(m).unwrap())
            .collect();
        std::fs::write(
            dir.path().join("metrics.jsonl"),
            format!("{}\n{}\n{{\"epoch\": 3, \"tra", lines[0], lines[1]),
        )
        .unwrap();
        let read = RunDir::metrics_of(dir.path()).unwrap();
        assert_eq!(read.len(), 2);
        assert_eq!(read[1].test_accuracy, 0.95);
    }

    #[test]
    fn legend_names_are_the_folders_unless_two_are_alike() {
        let runs = [
            PathBuf::from("runs/mlp-1"),
            PathBuf::from("runs/cnn-1/"),
            PathBuf::from("a/seed"),
            PathBuf::from("b/seed"),
        ];
        assert_eq!(legend_names(&runs), ["mlp-1", "cnn-1", "a/seed", "b/seed"]);
    }

    #[test]
    fn axis_tops_are_round() {
        for (value, top) in [(0.27, 0.3), (2.31, 3.0), (0.0, 1.0), (0.046, 0.055)] {
            assert!(
                (nice_top(value) - top).abs() < 1e-9,
                "{value}: {}",
                nice_top(value)
            );
        }
    }

    #[test]
    fn two_runs_are_drawn_into_png_and_svg() {
        let dir = tempfile::tempdir().unwrap();
        let runs = vec![
            Curves::of("first-run".into(), &[metrics(1, 0.9), metrics(2, 0.95)]),
            Curves::of("second-run".into(), &[metrics(1, 0.8)]),
        ];
        let png = dir.path().join("c.png");
        let svg = dir.path().join("c.svg");
        draw::png(&png, SIZE, |root| draw_curves(&root, &runs)).unwrap();
        draw::svg(&svg, SIZE, |root| draw_curves(&root, &runs)).unwrap();
        assert_eq!(image::open(&png).unwrap().width(), SIZE.0);
        let text = std::fs::read_to_string(&svg).unwrap();
        assert!(text.contains("first-run") && text.contains("second-run"));
    }
}
