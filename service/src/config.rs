//! Config files for cerv and fient: TOML whose keys are the programs' long
//! options, so that anything a flag sets a file can set, by construction.
//!
//! ```toml
//! # cerv.toml
//! listen = "0.0.0.0:8081"
//! ntp-listen = ["0.0.0.0:123", "[::]:123"]   # a repeatable option: a list
//! ntp-stratum = 2
//! rate-limit = 50
//! log-format = "json"
//! ```
//!
//! A key is an option's long name without the dashes (positional
//! arguments by their name: fient's `servers`); a flag takes `true` or
//! `false`; a repeatable option takes a list. Every value goes through the
//! very parser the option uses, so a file is checked exactly as a command
//! line is, and an error names the file, the line and the key. Options
//! given on the command line win over the file (a list given there
//! replaces the file's, it does not add to it).

use clap::parser::ValueSource;
use clap::{Arg, ArgAction, Command};
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Keys a file may not set: the file itself, and one-shot actions.
const NOT_IN_FILES: [&str; 5] = ["config", "check-config", "generate-key", "help", "version"];

/// A config file that cannot be used. Each message names the file, and the
/// line and key where there is one.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// It cannot be read.
    #[error("cannot read config file '{path}': {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It is not TOML.
    #[error("config file '{path}': {message}")]
    Syntax {
        /// The file.
        path: String,
        /// toml's message, with the line and column.
        message: String,
    },
    /// A key no option has.
    #[error("{path}:{line}: unknown key '{key}'{hint}")]
    UnknownKey {
        /// The file.
        path: String,
        /// Its line.
        line: usize,
        /// The key.
        key: String,
        /// A close known key, if there is one.
        hint: String,
    },
    /// A value the option does not take.
    #[error("{path}:{line}: key '{key}': {message}")]
    BadValue {
        /// The file.
        path: String,
        /// Its line.
        line: usize,
        /// The key.
        key: String,
        /// What is wrong.
        message: String,
    },
}

/// Why the command line (with its config file) cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// The command line itself: clap's error (help and version too).
    #[error(transparent)]
    Clap(#[from] clap::Error),
    /// The config file.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// Where the file's settings came from, to say so in later errors.
#[derive(Clone, Debug, Default)]
pub struct FileInfo {
    /// The file.
    pub path: PathBuf,
    /// Each key the file set (and that the command line did not), with
    /// its line.
    pub keys: BTreeMap<String, usize>,
    /// The values the file gave each of those keys.
    pub values: BTreeMap<String, Vec<String>>,
}

impl FileInfo {
    /// `message`, with where in the file the option it is about was set
    /// (` (set in cerv.toml line 4)`), when the file set it: the first
    /// option the message names, else the first whose value it quotes.
    pub fn locate(&self, message: &str) -> String {
        let named = self
            .keys
            .iter()
            .find(|(key, _)| message.contains(&format!("--{key}")));
        let quoted = || {
            self.keys.iter().find(|(key, _)| {
                self.values.get(*key).is_some_and(|vs| {
                    vs.iter()
                        .any(|v| !v.is_empty() && message.contains(&format!("'{v}'")))
                })
            })
        };
        match named.or_else(quoted) {
            Some((_, line)) => format!("{message} (set in {} line {line})", self.path.display()),
            None => message.to_string(),
        }
    }
}

/// The command line, with the file named by its `--config` under it.
pub struct Layered<A> {
    /// The options.
    pub args: A,
    /// The file, if one was given.
    pub file: Option<FileInfo>,
}

/// Parses `argv` as `A`, with the TOML file of its `--config` option (if
/// given) supplying whatever the command line does not.
pub fn parse<A: clap::Parser>(argv: Vec<OsString>) -> Result<Layered<A>, LayerError> {
    let cmd = A::command();
    let matches = cmd.clone().try_get_matches_from(&argv)?;
    let Some(path) = matches.get_one::<PathBuf>("config").cloned() else {
        return Ok(Layered {
            args: A::try_parse_from(&argv)?,
            file: None,
        });
    };
    let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let (from_file, info) = file_args(&cmd, &path, &text, |id| {
        matches.value_source(id) == Some(ValueSource::CommandLine)
    })?;
    // The file's options first, then the command line's: the program name,
    // the file's, the rest.
    let mut combined = argv[..1].to_vec();
    combined.extend(from_file);
    combined.extend(argv[1..].iter().cloned());
    let args = A::try_parse_from(&combined)?;
    Ok(Layered {
        args,
        file: Some(info),
    })
}

/// The arguments a file stands for, each value checked by its option's
/// parser; `on_command_line` says which options the command line set
/// (those the file does not).
fn file_args(
    cmd: &Command,
    path: &Path,
    text: &str,
    on_command_line: impl Fn(&str) -> bool,
) -> Result<(Vec<OsString>, FileInfo), ConfigError> {
    let shown = path.display().to_string();
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigError::Syntax {
            path: shown.clone(),
            message: e.to_string().trim().replace('\n', " "),
        })?;
    let mut options = Vec::new();
    let mut positionals = Vec::new();
    let mut info = FileInfo {
        path: path.to_owned(),
        keys: BTreeMap::new(),
        values: BTreeMap::new(),
    };
    for (key, value) in &table {
        let line = line_of(text, key);
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(&**key) || (a.is_positional() && a.get_id() == key))
            .filter(|_| !NOT_IN_FILES.contains(&key.as_str()));
        let Some(arg) = arg else {
            return Err(ConfigError::UnknownKey {
                path: shown,
                line,
                key: key.clone(),
                hint: closest(cmd, key)
                    .map_or(String::new(), |k| format!(" (did you mean '{k}'?)")),
            });
        };
        let bad = |message: String| ConfigError::BadValue {
            path: shown.clone(),
            line,
            key: key.clone(),
            message,
        };
        if on_command_line(arg.get_id().as_str()) {
            continue;
        }
        let is_flag = matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse);
        let many = matches!(arg.get_action(), ArgAction::Append)
            || arg.get_num_args().is_some_and(|n| n.max_values() > 1);
        let values: Vec<String> = match value {
            toml::Value::Boolean(b) if is_flag => {
                if *b {
                    options.push(OsString::from(format!("--{key}")));
                }
                info.keys.insert(key.clone(), line);
                continue;
            }
            _ if is_flag => return Err(bad("expected true or false".into())),
            toml::Value::Array(items) if many => items
                .iter()
                .map(|v| {
                    scalar(v).ok_or_else(|| bad("expected a list of strings or numbers".into()))
                })
                .collect::<Result<_, _>>()?,
            toml::Value::Array(_) => return Err(bad("takes one value, not a list".into())),
            v => vec![
                scalar(v).ok_or_else(|| bad("expected a string, a number or true/false".into()))?,
            ],
        };
        for v in &values {
            check(arg, v).map_err(&bad)?;
        }
        info.keys.insert(key.clone(), line);
        info.values.insert(key.clone(), values.clone());
        if arg.is_positional() {
            positionals.extend(values.into_iter().map(OsString::from));
        } else {
            for v in values {
                options.push(OsString::from(format!("--{key}")));
                options.push(OsString::from(v));
            }
        }
    }
    options.extend(positionals);
    Ok((options, info))
}

fn scalar(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Runs `value` through the option's own parser (on a one-argument
/// command, so that nothing else the program requires is asked for); the
/// error in words.
fn check(arg: &Arg, value: &str) -> Result<(), String> {
    Command::new("config")
        .arg(
            Arg::new("value")
                .value_parser(arg.get_value_parser().clone())
                .allow_hyphen_values(true)
                .required(true),
        )
        .try_get_matches_from(["config", value])
        .map(|_| ())
        .map_err(|e| {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or_default();
            first
                .trim_start_matches("error: ")
                .replace(" for '<value>'", "")
        })
}

/// The line (from 1) where `key` is set: flat keys, one per line.
fn line_of(text: &str, key: &str) -> usize {
    text.lines()
        .position(|l| {
            let l = l.trim_start();
            let quoted = format!("\"{key}\"");
            (l.starts_with(key) && l[key.len()..].trim_start().starts_with('='))
                || (l.starts_with(&quoted) && l[quoted.len()..].trim_start().starts_with('='))
        })
        .map_or(0, |i| i + 1)
}

/// A known key close to `key` (one edit, or the same letters with dashes
/// for underscores), for the error.
fn closest(cmd: &Command, key: &str) -> Option<String> {
    let dashed = key.replace('_', "-");
    cmd.get_arguments()
        .filter_map(|a| {
            a.get_long()
                .map(str::to_string)
                .or_else(|| a.is_positional().then(|| a.get_id().to_string()))
        })
        .filter(|k| !NOT_IN_FILES.contains(&k.as_str()))
        .find(|k| *k == dashed || edit_distance(k, key) <= 2)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for j in 0..b.len() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != b[j]))
                .min(row[j] + 1)
                .min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Demo {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long, default_value = "127.0.0.1:8081")]
        listen: String,
        #[arg(long, default_value_t = 100)]
        rate_limit: u32,
        #[arg(long = "ntp-listen")]
        ntp_listen: Vec<String>,
        #[arg(long)]
        json: bool,
        #[arg(long, value_parser = clap::value_parser!(u8).range(1..=15))]
        stratum: Option<u8>,
        servers: Vec<String>,
    }

    fn with_file(text: &str, args: &[&str]) -> Result<Layered<Demo>, LayerError> {
        let dir = std::env::temp_dir().join(format!("cerv-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{}.toml", text.len()));
        std::fs::write(&path, text).unwrap();
        let mut argv: Vec<OsString> = vec!["demo".into(), "--config".into(), path.clone().into()];
        argv.extend(args.iter().map(OsString::from));
        let out = parse::<Demo>(argv);
        let _ = std::fs::remove_file(&path);
        out
    }

    #[test]
    fn a_file_sets_what_the_command_line_does_not() {
        let l = with_file(
            "listen = \"0.0.0.0:9\"\nrate-limit = 5\nntp-listen = [\"a:1\", \"b:2\"]\njson = true\nservers = [\"x\", \"y\"]\n",
            &["--rate-limit", "7"],
        )
        .unwrap();
        assert_eq!(l.args.listen, "0.0.0.0:9");
        assert_eq!(l.args.rate_limit, 7, "the flag wins");
        assert_eq!(l.args.ntp_listen, ["a:1", "b:2"]);
        assert!(l.args.json);
        assert_eq!(l.args.servers, ["x", "y"]);
        let info = l.file.unwrap();
        assert_eq!(info.keys.get("listen"), Some(&1));
        assert!(!info.keys.contains_key("rate-limit"));
        assert!(
            info.locate("invalid --ntp-listen 'a:1'")
                .ends_with("line 3)")
        );
        assert!(info.locate("cannot resolve 'b:2'").ends_with("line 3)"));
        assert_eq!(info.locate("cannot resolve 'c:3'"), "cannot resolve 'c:3'");
    }

    #[test]
    fn a_list_on_the_command_line_replaces_the_files() {
        let l = with_file(
            "ntp-listen = [\"a:1\"]\nservers = [\"x\"]\n",
            &["--ntp-listen", "c:3", "z"],
        )
        .unwrap();
        assert_eq!(l.args.ntp_listen, ["c:3"]);
        assert_eq!(l.args.servers, ["z"]);
    }

    #[test]
    fn errors_name_the_file_the_line_and_the_key() {
        let err = |text: &str| match with_file(text, &[]) {
            Err(LayerError::Config(e)) => e.to_string(),
            other => panic!("{:?}", other.map(|l| l.args)),
        };
        let e = err("listen = \"x\"\n\nrate_limit = 3\n");
        assert!(
            e.contains(".toml:3: unknown key 'rate_limit' (did you mean 'rate-limit'?)"),
            "{e}"
        );
        let e = err("rate-limit = \"fast\"\n");
        assert!(
            e.contains(".toml:1: key 'rate-limit': invalid value 'fast'"),
            "{e}"
        );
        let e = err("\n stratum = 99\n");
        assert!(
            e.contains(".toml:2: key 'stratum'") && e.contains("99"),
            "{e}"
        );
        let e = err("json = \"yes\"\n");
        assert!(e.contains("key 'json': expected true or false"), "{e}");
        let e = err("listen = [\"a\", \"b\"]\n");
        assert!(e.contains("takes one value, not a list"), "{e}");
        let e = err("config = \"other.toml\"\n");
        assert!(e.contains("unknown key 'config'"), "{e}");
        let e = err("listen = \n");
        assert!(e.contains("line 1"), "{e}");
        let missing = parse::<Demo>(vec![
            "demo".into(),
            "--config".into(),
            "/nonexistent/x.toml".into(),
        ]);
        assert!(matches!(
            missing,
            Err(LayerError::Config(ConfigError::Read { .. }))
        ));
    }

    #[test]
    fn without_a_file_it_is_the_command_line() {
        let l = parse::<Demo>(vec!["demo".into(), "--json".into()]).unwrap();
        assert!(l.args.json && l.file.is_none());
    }
}
