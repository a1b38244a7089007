//! How both binaries speak: to a person on a terminal, in plain timestamped lines off one
//! (files, pipes, containers), or as one JSON object per line for log collectors (Loki,
//! Elasticsearch, Cloud Logging).
//!
//! Every message is a `tracing` event. The *format* decides how an event is written:
//! - `human`: the message alone, warnings and errors marked (in colour where the terminal takes
//!   it and `NO_COLOR` is unset), no timestamps and no module paths. Events marked `detail` (how
//!   long MNIST took to load, where the worker logs are) are left out unless `-v`.
//! - `plain`: a UTC timestamp, the level and the module before the message, as `tracing` writes
//!   them by default; what a file or a container log wants.
//! - `json`: one object per event with its fields flattened, so that the structured fields
//!   (`event`, `epoch`, `step`, `rank`, `test_accuracy`, ...) are there to query.
//!
//! An event carrying an `event` field (`event = "epoch"`, `"progress"`, `"done"`, ...) has a
//! stable shape for machines; its message says the same for people, so `human` and `plain` print
//! the message alone. Any other event's fields follow its message as `key=value`.
//!
//! Verbosity: `-q` keeps errors and the final line ([`SUMMARY`]), whatever `RUST_LOG` says;
//! otherwise `RUST_LOG`, when set, decides the levels; without it `-v` adds detail, `-vv` debug
//! and `-vvv` trace of Lockstep's own modules.

use std::fmt::{self, Write as _};
use std::io::{IsTerminal, Write as _};
use std::sync::{Mutex, OnceLock};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::{filter_fn, EnvFilter};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// Target of the final line of a job, which `-q` still shows.
pub const SUMMARY: &str = "lockstep::summary";

/// The environment variable that sets the format, as `--log-format` does.
pub const FORMAT_ENV: &str = "LOCKSTEP_LOG_FORMAT";

/// How output is written; `auto` is `human` on a terminal and `plain` elsewhere.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// `human` when stderr is a terminal, `plain` otherwise.
    #[default]
    Auto,
    /// For a person: messages alone, aligned epoch lines, a summary at the end.
    Human,
    /// Timestamped lines with level and module, for files and pipes.
    Plain,
    /// One JSON object per line, for log collectors.
    Json,
}

/// The logging flags both binaries take.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct LogArgs {
    /// Output format: auto (human on a terminal, plain otherwise), human, plain (timestamped
    /// lines) or json (one object per line).
    #[arg(long, env = FORMAT_ENV, value_enum, default_value_t, global = true)]
    pub log_format: LogFormat,
    /// Print only errors and the final line.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// More detail: -v (everything at info level), -vv (debug), -vvv (trace). RUST_LOG, when
    /// set, decides the levels instead (except with -q).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
}

/// The format in force, once `auto` is decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// For a person at a terminal.
    Human,
    /// Timestamped lines.
    Plain,
    /// One JSON object per line.
    Json,
}

/// What [`init`] decided, for code that writes to the terminal besides `tracing` (the
/// configuration header, the progress bar, the final table).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Output {
    /// The format.
    pub format: Format,
    /// Whether escape sequences for colour may be written to stderr.
    pub color: bool,
    /// `-q`: errors and the final line only.
    pub quiet: bool,
    /// The count of `-v`.
    pub verbose: u8,
}

impl Output {
    /// Decides the output for `args`, given whether stderr is a terminal and the environment
    /// (`NO_COLOR`, `TERM`).
    pub fn decide(args: &LogArgs, terminal: bool, env: impl Fn(&str) -> Option<String>) -> Self {
        let format = match args.log_format {
            LogFormat::Auto if terminal => Format::Human,
            LogFormat::Auto | LogFormat::Plain => Format::Plain,
            LogFormat::Human => Format::Human,
            LogFormat::Json => Format::Json,
        };
        // https://no-color.org: a NO_COLOR that is present and not empty turns colour off.
        let no_color = env("NO_COLOR").is_some_and(|v| !v.is_empty());
        let dumb = env("TERM").is_some_and(|t| t == "dumb");
        Self {
            format,
            color: terminal && !no_color && !dumb && format != Format::Json,
            quiet: args.quiet,
            verbose: args.verbose,
        }
    }

    /// Whether the person-oriented extras (header, progress bar, final table) are shown.
    pub fn for_people(&self) -> bool {
        self.format == Format::Human && !self.quiet
    }

    /// The level filter: errors only with `-q`, else `RUST_LOG` when set, else from `-v`; the
    /// final line always passes.
    fn filter(&self, rust_log: Option<String>) -> EnvFilter {
        let own = |level: &str| {
            format!("info,lockstep_common={level},lockstep_coordinator={level},lockstep_worker={level},lockstep={level}")
        };
        let directives = match rust_log.filter(|s| !s.trim().is_empty()) {
            _ if self.quiet => "error".to_string(),
            Some(given) => given,
            None => match self.verbose {
                0 | 1 => "info".to_string(),
                2 => own("debug"),
                _ => own("trace"),
            },
        };
        EnvFilter::try_new(format!("{directives},{SUMMARY}=info"))
            .or_else(|_| EnvFilter::try_new(format!("info,{SUMMARY}=info")))
            .expect("a valid default filter")
    }
}

static OUTPUT: OnceLock<Output> = OnceLock::new();

/// The output decided at start; plain lines when [`init`] was not called (tests, libraries).
pub fn output() -> Output {
    OUTPUT.get().copied().unwrap_or(Output {
        format: Format::Plain,
        color: false,
        quiet: false,
        verbose: 0,
    })
}

/// Installs the subscriber for `args` on stderr. Both binaries call it first thing; a second
/// call keeps the first's decision.
pub fn init(args: &LogArgs) -> Output {
    let out = Output::decide(args, std::io::stderr().is_terminal(), |k| {
        std::env::var(k).ok()
    });
    if OUTPUT.set(out).is_err() {
        return output();
    }
    let filter = out.filter(std::env::var("RUST_LOG").ok());
    let registry = tracing_subscriber::registry().with(filter);
    let _ = match out.format {
        Format::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(false)
                    .with_writer(Stderr),
            )
            .try_init(),
        Format::Human | Format::Plain => {
            let hide_detail = out.format == Format::Human && out.verbose == 0;
            registry
                .with(
                    tracing_subscriber::fmt::layer()
                        .event_format(Lines { out })
                        .with_writer(Stderr)
                        .with_filter(filter_fn(move |meta| {
                            !(hide_detail && meta.fields().field("detail").is_some())
                        })),
                )
                .try_init()
        }
    };
    out
}

/// Writes `text` in `style` (an SGR code such as "1;31") when colour is on.
pub fn paint(out: &Output, style: &str, text: &str) -> String {
    if out.color {
        format!("\x1b[{style}m{text}\x1b[0m")
    } else {
        text.to_string()
    }
}

/// Reports the error a binary ends with: `error: ...` with its whole chain of causes (in red on
/// a colour terminal), or, with `--log-format json`, one object whose `message` holds it.
pub fn report_error(out: &Output, error: &anyhow::Error) {
    let text = format!("{error:#}");
    let line = match out.format {
        Format::Json => {
            let mut stamp = String::new();
            let _ = SystemTime.format_time(&mut Writer::new(&mut stamp));
            let object = serde_json::json!({
                "timestamp": stamp,
                "level": "ERROR",
                "event": "failed",
                "message": text,
            });
            format!("{object}\n")
        }
        Format::Human | Format::Plain => format!("{}: {text}\n", paint(out, "1;31", "error")),
    };
    write_stderr(line.as_bytes());
}

/// A progress bar on stderr that log lines must not tear: each line is written with the bar
/// cleared, then the bar is drawn again below it.
static BAR: Mutex<Option<indicatif::ProgressBar>> = Mutex::new(None);

/// Makes `bar` the one log lines are written around (None: no bar).
pub fn hold_bar(bar: Option<indicatif::ProgressBar>) {
    *BAR.lock().unwrap_or_else(|e| e.into_inner()) = bar;
}

/// Writes `text` to stderr around the progress bar, if one is shown.
pub fn write_stderr(text: &[u8]) {
    let bar = BAR.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let write = || {
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(text);
        let _ = err.flush();
    };
    match bar {
        Some(bar) if !bar.is_hidden() => bar.suspend(write),
        _ => write(),
    }
}

/// stderr for `tracing`: a line is buffered whole, then written around the progress bar.
struct Stderr;

/// One log line on its way to stderr.
struct LineBuffer(Vec<u8>);

impl std::io::Write for LineBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LineBuffer {
    fn drop(&mut self) {
        if !self.0.is_empty() {
            write_stderr(&self.0);
        }
    }
}

impl<'a> MakeWriter<'a> for Stderr {
    type Writer = LineBuffer;
    fn make_writer(&'a self) -> Self::Writer {
        LineBuffer(Vec::with_capacity(256))
    }
}

/// The `human` and `plain` line formats.
struct Lines {
    out: Output,
}

/// An event's message and its other fields.
#[derive(Default)]
struct Fields {
    message: String,
    rest: String,
    structured: bool,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message.push_str(value),
            _ => self.record_debug(field, &value),
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        match field.name() {
            "message" => {
                let _ = write!(self.message, "{value:?}");
            }
            "event" => self.structured = true,
            "detail" => {}
            name => {
                let _ = write!(self.rest, " {name}={value:?}");
            }
        }
    }
}

impl<S, N> FormatEvent<S, N> for Lines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let meta = event.metadata();
        let level = *meta.level();
        let out = &self.out;
        match out.format {
            Format::Human => {
                let mark = match level {
                    Level::ERROR => Some(("1;31", "error")),
                    Level::WARN => Some(("1;33", "warning")),
                    Level::INFO => None,
                    Level::DEBUG => Some(("2", "debug")),
                    Level::TRACE => Some(("2", "trace")),
                };
                if let Some((style, word)) = mark {
                    write!(w, "{}: ", paint(out, style, word))?;
                }
                if level > Level::INFO {
                    write!(w, "{} ", paint(out, "2", meta.target()))?;
                }
            }
            Format::Plain | Format::Json => {
                SystemTime.format_time(&mut w)?;
                let name = match level {
                    Level::ERROR => paint(out, "31", "ERROR"),
                    Level::WARN => paint(out, "33", " WARN"),
                    Level::INFO => paint(out, "32", " INFO"),
                    Level::DEBUG => paint(out, "34", "DEBUG"),
                    Level::TRACE => paint(out, "35", "TRACE"),
                };
                write!(w, " {name} {}: ", meta.target())?;
            }
        }
        w.write_str(&fields.message)?;
        if !fields.structured {
            w.write_str(&fields.rest)?;
        }
        writeln!(w)
    }
}

/// A count of samples per second for people: 49.5K, 1.2M, 950.
pub fn rate(per_second: f64) -> String {
    match per_second {
        r if r >= 1e6 => format!("{:.1}M", r / 1e6),
        r if r >= 1e4 => format!("{:.1}K", r / 1e3),
        r => format!("{r:.0}"),
    }
}

/// A duration for people: 850 ms, 1.2 s, 12.3 s, 2 min 05 s.
pub fn duration(seconds: f64) -> String {
    match seconds {
        s if s < 1.0 => format!("{:.0} ms", s * 1000.0),
        s if s < 120.0 => format!("{s:.1} s"),
        s => {
            let whole = s.round() as u64;
            format!("{} min {:02} s", whole / 60, whole % 60)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    fn args(format: LogFormat) -> LogArgs {
        LogArgs {
            log_format: format,
            ..Default::default()
        }
    }

    #[test]
    fn auto_is_human_on_a_terminal_and_plain_elsewhere() {
        let on = Output::decide(&args(LogFormat::Auto), true, env(&[]));
        assert_eq!((on.format, on.color), (Format::Human, true));
        let off = Output::decide(&args(LogFormat::Auto), false, env(&[]));
        assert_eq!((off.format, off.color), (Format::Plain, false));
        // Asked for, a format holds whatever stderr is.
        let json = Output::decide(&args(LogFormat::Json), true, env(&[]));
        assert_eq!((json.format, json.color), (Format::Json, false));
        let human = Output::decide(&args(LogFormat::Human), false, env(&[]));
        assert_eq!((human.format, human.color), (Format::Human, false));
    }

    #[test]
    fn no_color_and_a_dumb_terminal_turn_colour_off_but_an_empty_no_color_does_not() {
        let a = args(LogFormat::Auto);
        assert!(!Output::decide(&a, true, env(&[("NO_COLOR", "1")])).color);
        assert!(!Output::decide(&a, true, env(&[("TERM", "dumb")])).color);
        assert!(Output::decide(&a, true, env(&[("NO_COLOR", "")])).color);
        let out = Output::decide(&a, true, env(&[("NO_COLOR", "1")]));
        assert_eq!(paint(&out, "1;31", "error"), "error");
    }

    /// The directives of a filter, in any order.
    fn directives(filter: EnvFilter) -> Vec<String> {
        let mut d: Vec<String> = filter.to_string().split(',').map(str::to_string).collect();
        d.sort();
        d
    }

    #[test]
    fn quiet_keeps_errors_and_the_final_line_and_rust_log_decides_when_set() {
        let quiet = Output::decide(
            &LogArgs {
                quiet: true,
                ..Default::default()
            },
            false,
            env(&[]),
        );
        let only_errors = vec!["error".to_string(), format!("{SUMMARY}=info")];
        assert_eq!(directives(quiet.filter(None)), only_errors);
        // -q is asked for on the command line: it holds over RUST_LOG.
        assert_eq!(directives(quiet.filter(Some("debug".into()))), only_errors);
        let plain = Output::decide(&LogArgs::default(), false, env(&[]));
        assert!(
            directives(plain.filter(Some("lockstep_worker=trace".into())))
                .contains(&"lockstep_worker=trace".to_string())
        );
        let vv = Output::decide(
            &LogArgs {
                verbose: 2,
                ..Default::default()
            },
            false,
            env(&[]),
        );
        assert!(directives(vv.filter(None)).contains(&"lockstep_coordinator=debug".to_string()));
        // A RUST_LOG that does not parse falls back to info rather than failing the job.
        assert!(directives(plain.filter(Some("=[".into()))).contains(&"info".to_string()));
    }

    #[test]
    fn rates_and_durations_read_as_a_person_would_write_them() {
        assert_eq!(rate(49_450.0), "49.5K");
        assert_eq!(rate(950.4), "950");
        assert_eq!(rate(1_234_000.0), "1.2M");
        assert_eq!(duration(0.85), "850 ms");
        assert_eq!(duration(1.21), "1.2 s");
        assert_eq!(duration(125.0), "2 min 05 s");
    }
}
