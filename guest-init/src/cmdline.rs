//! The kernel command line and the choice of the command to run.
//!
//! Parsing follows the kernel's own `next_arg()` (lib/cmdline.c): parameters are
//! separated by whitespace, double quotes group words and are stripped around a whole
//! parameter or a value, and a bare `--` ends the kernel's parameters (the words after
//! it become PID 1's argv). Only ASCII whitespace separates here; the kernel also
//! treats byte 0xa0 as a space, which no sane command line contains.

use std::ffi::OsString;

/// One kernel parameter: `name` or `name=value`, quotes already stripped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Param {
    /// Text before the first `=` (all of it when there is none).
    pub name: String,
    /// Text after the first `=`, if there was one.
    pub value: Option<String>,
}

/// A parsed kernel command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelCmdline {
    /// The kernel's parameters, in order, up to a bare `--`.
    pub params: Vec<Param>,
    /// The words after `--`: what the kernel passes to PID 1 as `argv[1..]`.
    pub init_args: Vec<String>,
}

impl KernelCmdline {
    /// Parses `cmdline` (the contents of `/proc/cmdline`).
    pub fn parse(cmdline: &str) -> Self {
        let mut parsed = Self::default();
        let mut rest = cmdline.trim_start_matches(is_space);
        let mut after_dashes = false;
        while !rest.is_empty() {
            let (param, next) = next_arg(rest);
            rest = next;
            if after_dashes {
                // The kernel hands these to init re-joined as `name=value`.
                parsed.init_args.push(match param.value {
                    Some(value) => format!("{}={value}", param.name),
                    None => param.name,
                });
            } else if param.value.is_none() && param.name == "--" {
                after_dashes = true;
            } else {
                parsed.params.push(param);
            }
        }
        parsed
    }

    /// The value of the last `name=value` parameter called `name` (later ones win,
    /// as in the kernel).
    pub fn value(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .rev()
            .find(|p| p.name == name)
            .and_then(|p| p.value.as_deref())
    }
}

fn is_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0b' | '\x0c')
}

/// Splits one parameter off the front of `args` (which starts with a non-space) and
/// returns it with the remaining text, leading spaces skipped.
fn next_arg(args: &str) -> (Param, &str) {
    let bytes = args.as_bytes();
    let quoted = bytes.first() == Some(&b'"');
    let start = usize::from(quoted);
    let mut in_quote = quoted;
    let mut equals = None;
    let mut end = bytes.len();
    for (i, &b) in bytes.iter().enumerate().skip(start) {
        if is_space(char::from(b)) && !in_quote {
            end = i;
            break;
        }
        if equals.is_none() && b == b'=' {
            equals = Some(i);
        }
        if b == b'"' {
            in_quote = !in_quote;
        }
    }
    // Every index used below sits next to an ASCII byte, so slicing stays on char
    // boundaries.
    let token = &args[start..end];
    let rest = args[end..].trim_start_matches(is_space);
    let param = match equals {
        None => Param {
            name: strip_closing_quote(token, quoted).to_owned(),
            value: None,
        },
        Some(eq) => {
            let name = &args[start..eq];
            let mut value = &args[eq + 1..end];
            let value_quoted = value.starts_with('"');
            if value_quoted {
                value = &value[1..];
            }
            Param {
                name: name.to_owned(),
                value: Some(strip_closing_quote(value, quoted || value_quoted).to_owned()),
            }
        }
    };
    (param, rest)
}

fn strip_closing_quote(text: &str, opened: bool) -> &str {
    match text.strip_suffix('"') {
        Some(stripped) if opened => stripped,
        _ => text,
    }
}

/// Where the command came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandSource {
    /// PID 1's own `argv[1..]` (the words after `--`).
    Argv,
    /// The `atoll.cmd=` kernel parameter.
    AtollCmd,
}

/// The command PID 1 will run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelectedCommand {
    /// `argv[0]` is the program.
    pub argv: Vec<OsString>,
    /// Which input won.
    pub source: CommandSource,
}

/// The kernel parameter naming a command.
pub const ATOLL_CMD: &str = "atoll.cmd";

/// Picks the command: PID 1's `argv[1..]` wins; otherwise `atoll.cmd=` from the
/// kernel command line (its value split on whitespace); otherwise none.
///
/// `cmdline` is only consulted when `init_args` is empty.
pub fn select_command<E>(
    init_args: &[OsString],
    cmdline: impl FnOnce() -> Result<String, E>,
) -> Result<Option<SelectedCommand>, E> {
    if !init_args.is_empty() {
        return Ok(Some(SelectedCommand {
            argv: init_args.to_vec(),
            source: CommandSource::Argv,
        }));
    }
    let parsed = KernelCmdline::parse(&cmdline()?);
    let argv: Vec<OsString> = parsed
        .value(ATOLL_CMD)
        .unwrap_or("")
        .split(is_space)
        .filter(|word| !word.is_empty())
        .map(OsString::from)
        .collect();
    Ok((!argv.is_empty()).then_some(SelectedCommand {
        argv,
        source: CommandSource::AtollCmd,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;

    fn param(name: &str, value: Option<&str>) -> Param {
        Param {
            name: name.to_owned(),
            value: value.map(str::to_owned),
        }
    }

    fn os(words: &[&str]) -> Vec<OsString> {
        words.iter().map(OsString::from).collect()
    }

    #[test]
    fn parse_plain_params_splits_names_and_values() {
        let parsed = KernelCmdline::parse("console=ttyS0 quiet  panic=-1\n");
        assert_eq!(
            parsed.params,
            vec![
                param("console", Some("ttyS0")),
                param("quiet", None),
                param("panic", Some("-1")),
            ]
        );
        assert!(parsed.init_args.is_empty());
    }

    #[test]
    fn parse_quoted_value_keeps_spaces_and_strips_quotes() {
        let parsed = KernelCmdline::parse(r#"atoll.cmd="/bin/sh -c true" quiet"#);
        assert_eq!(parsed.value("atoll.cmd"), Some("/bin/sh -c true"));
        assert_eq!(parsed.params[1], param("quiet", None));
    }

    #[test]
    fn parse_fully_quoted_param_strips_outer_quotes() {
        let parsed = KernelCmdline::parse(r#""a=b c" "d e""#);
        assert_eq!(
            parsed.params,
            vec![param("a", Some("b c")), param("d e", None)]
        );
    }

    #[test]
    fn parse_quote_inside_value_is_kept() {
        let parsed = KernelCmdline::parse(r#"x=a"b c" y"#);
        assert_eq!(
            parsed.params,
            vec![param("x", Some(r#"a"b c""#)), param("y", None)]
        );
    }

    #[test]
    fn parse_unterminated_quote_runs_to_end() {
        let parsed = KernelCmdline::parse(r#"x="a b"#);
        assert_eq!(parsed.params, vec![param("x", Some("a b"))]);
    }

    #[test]
    fn parse_double_dash_moves_rest_to_init_args() {
        let parsed =
            KernelCmdline::parse(r#"console=ttyS0 reboot=k -- /bin/sh -c "echo hi; exit 7" a=b"#);
        assert_eq!(
            parsed.params,
            vec![param("console", Some("ttyS0")), param("reboot", Some("k"))]
        );
        assert_eq!(
            parsed.init_args,
            vec!["/bin/sh", "-c", "echo hi; exit 7", "a=b"]
        );
    }

    #[test]
    fn parse_atoll_cmd_after_double_dash_is_not_a_param() {
        let parsed = KernelCmdline::parse("quiet -- atoll.cmd=/bin/true");
        assert_eq!(parsed.value("atoll.cmd"), None);
        assert_eq!(parsed.init_args, vec!["atoll.cmd=/bin/true"]);
    }

    #[test]
    fn value_repeated_param_last_wins() {
        let parsed = KernelCmdline::parse("atoll.cmd=/a atoll.cmd=/b");
        assert_eq!(parsed.value("atoll.cmd"), Some("/b"));
    }

    #[test]
    fn parse_empty_or_blank_gives_nothing() {
        assert_eq!(KernelCmdline::parse(""), KernelCmdline::default());
        assert_eq!(KernelCmdline::parse(" \n"), KernelCmdline::default());
    }

    #[test]
    fn select_argv_wins_over_atoll_cmd_without_reading_cmdline() {
        let selected = select_command(
            &os(&["/bin/echo", "hi"]),
            || -> Result<String, Infallible> {
                panic!("the cmdline must not be read when argv is given")
            },
        );
        assert_eq!(
            selected,
            Ok(Some(SelectedCommand {
                argv: os(&["/bin/echo", "hi"]),
                source: CommandSource::Argv,
            }))
        );
    }

    #[test]
    fn select_atoll_cmd_value_split_on_whitespace() {
        let selected = select_command(&[], || {
            Ok::<_, Infallible>(r#"quiet atoll.cmd="/bin/sh  -c true" panic=-1"#.to_owned())
        });
        assert_eq!(
            selected,
            Ok(Some(SelectedCommand {
                argv: os(&["/bin/sh", "-c", "true"]),
                source: CommandSource::AtollCmd,
            }))
        );
    }

    #[test]
    fn select_nothing_given_gives_no_command() {
        let selected = select_command(&[], || {
            Ok::<_, Infallible>("console=ttyS0 quiet".to_owned())
        });
        assert_eq!(selected, Ok(None));
    }

    #[test]
    fn select_empty_atoll_cmd_gives_no_command() {
        let selected = select_command(&[], || Ok::<_, Infallible>("atoll.cmd= quiet".to_owned()));
        assert_eq!(selected, Ok(None));
    }

    #[test]
    fn select_cmdline_read_error_is_returned() {
        let selected = select_command(&[], || Err::<String, _>("unreadable"));
        assert_eq!(selected, Err("unreadable"));
    }
}
