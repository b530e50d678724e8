//! Kernel configuration fragments: parsing Kconfig `.config` syntax, the cache key of
//! a guest kernel build, and the check that `make allnoconfig` really applied every
//! option the fragment asked for (it silently drops options whose dependencies are
//! not met).

use std::collections::BTreeMap;
use std::fmt;

use sha2::{Digest, Sha256};

/// The project's guest kernel fragment (`image-builder/kernel/atoll-guest.config`).
pub const GUEST_FRAGMENT: &str = include_str!("../../kernel/atoll-guest.config");

/// Bumped whenever the build recipe changes in a way the fragment and source version
/// do not capture (make targets, stripping, files in the cache entry).
pub const CACHE_FORMAT: &str = "atoll-kernel-cache-v1";

/// Hex digits of the sha256 kept in cache directory names.
const HASH_LEN: usize = 16;

/// The value of one option as Kconfig writes it: `CONFIG_X=<raw>` or
/// `# CONFIG_X is not set` (and `=n`, which means the same).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionValue {
    Unset,
    /// The raw right-hand side: `y`, `m`, `64`, `"-atoll"` (quotes included).
    Set(String),
}

impl fmt::Display for OptionValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unset => f.write_str("not set"),
            Self::Set(v) => f.write_str(v),
        }
    }
}

/// A syntax error in a fragment.
#[derive(Debug, thiserror::Error)]
#[error(
    "line {line}: {text:?} is neither a comment nor CONFIG_X=value nor '# CONFIG_X is not set'"
)]
pub struct ParseConfigError {
    pub line: usize,
    pub text: String,
}

/// Parses `.config` syntax into option name → value. Comments and blank lines are
/// skipped; any other line is an error (a typo in a fragment must not pass silently).
pub fn parse_config(text: &str) -> Result<BTreeMap<String, OptionValue>, ParseConfigError> {
    let mut options = BTreeMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if let Some(rest) = line.strip_prefix('#') {
            let rest = rest.trim();
            if let Some(name) = rest.strip_suffix(" is not set") {
                if is_option_name(name) {
                    options.insert(name.to_owned(), OptionValue::Unset);
                }
            }
            continue;
        }
        if line.is_empty() {
            continue;
        }
        let parsed = line
            .split_once('=')
            .filter(|(name, value)| is_option_name(name) && !value.is_empty());
        let Some((name, value)) = parsed else {
            return Err(ParseConfigError {
                line: i + 1,
                text: raw.to_owned(),
            });
        };
        let value = if value == "n" {
            OptionValue::Unset
        } else {
            OptionValue::Set(value.to_owned())
        };
        options.insert(name.to_owned(), value);
    }
    Ok(options)
}

fn is_option_name(name: &str) -> bool {
    name.strip_prefix("CONFIG_").is_some_and(|rest| {
        !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    })
}

/// An option the fragment asked for that the generated `.config` does not have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DroppedOption {
    pub name: String,
    pub wanted: OptionValue,
    pub got: OptionValue,
}

impl fmt::Display for DroppedOption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (wanted {}, got {})",
            self.name, self.wanted, self.got
        )
    }
}

/// Options whose value in `generated` differs from what `fragment` requested. An
/// option absent from `generated` counts as not set.
pub fn dropped_options(
    fragment: &BTreeMap<String, OptionValue>,
    generated: &BTreeMap<String, OptionValue>,
) -> Vec<DroppedOption> {
    fragment
        .iter()
        .filter_map(|(name, wanted)| {
            let got = generated.get(name).cloned().unwrap_or(OptionValue::Unset);
            (got != *wanted).then(|| DroppedOption {
                name: name.clone(),
                wanted: wanted.clone(),
                got,
            })
        })
        .collect()
}

/// Number of options set (`CONFIG_X=...`) in a generated `.config`.
pub fn count_set(generated: &BTreeMap<String, OptionValue>) -> usize {
    generated
        .values()
        .filter(|v| matches!(v, OptionValue::Set(_)))
        .count()
}

/// The cache key of a kernel build: sha256 over the cache format, the source
/// package version and the fragment text, shortened to 16 hex digits.
pub fn config_hash(fragment: &str, source_version: &str) -> String {
    let mut h = Sha256::new();
    for part in [CACHE_FORMAT, source_version, fragment] {
        // Length-prefix each part so ("ab","c") and ("a","bc") differ.
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    let mut hex = hex::encode(h.finalize());
    hex.truncate(HASH_LEN);
    hex
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_hash_same_inputs_stable() {
        let a = config_hash("CONFIG_SMP=y\n", "6.12.117-1~deb12u1");
        let b = config_hash("CONFIG_SMP=y\n", "6.12.117-1~deb12u1");
        assert_eq!(a, b);
        assert_eq!(a.len(), 16);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn config_hash_fragment_change_changes_hash() {
        let a = config_hash("CONFIG_SMP=y\n", "6.12.117-1~deb12u1");
        let b = config_hash("CONFIG_SMP=y\nCONFIG_NET=y\n", "6.12.117-1~deb12u1");
        let c = config_hash("CONFIG_SMP=y \n", "6.12.117-1~deb12u1");
        assert_ne!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn config_hash_source_version_change_changes_hash() {
        let a = config_hash("CONFIG_SMP=y\n", "6.12.117-1~deb12u1");
        let b = config_hash("CONFIG_SMP=y\n", "6.12.118-1~deb12u1");
        assert_ne!(a, b);
    }

    #[test]
    fn config_hash_guest_fragment_comment_edit_changes_hash() {
        // Even a comment edit rebuilds: the hash covers the fragment bytes.
        let v = "6.12.117-1~deb12u1";
        let edited = format!("{GUEST_FRAGMENT}# note\n");
        assert_ne!(config_hash(GUEST_FRAGMENT, v), config_hash(&edited, v));
    }

    #[test]
    fn parse_config_values_unset_and_comments() {
        let text = "# a comment\n\nCONFIG_A=y\nCONFIG_B=64\nCONFIG_C=\"-atoll\"\n\
                    # CONFIG_D is not set\nCONFIG_E=n\n";
        let opts = parse_config(text).unwrap();
        assert_eq!(opts["CONFIG_A"], OptionValue::Set("y".into()));
        assert_eq!(opts["CONFIG_B"], OptionValue::Set("64".into()));
        assert_eq!(opts["CONFIG_C"], OptionValue::Set("\"-atoll\"".into()));
        assert_eq!(opts["CONFIG_D"], OptionValue::Unset);
        assert_eq!(opts["CONFIG_E"], OptionValue::Unset);
        assert_eq!(opts.len(), 5);
    }

    #[test]
    fn parse_config_typo_rejected_with_line_number() {
        let err = parse_config("CONFIG_A=y\nCONFG_B=y\n").unwrap_err();
        assert_eq!(err.line, 2);
        assert!(parse_config("CONFIG_A\n").is_err());
        assert!(parse_config("CONFIG_A=\n").is_err());
    }

    #[test]
    fn guest_fragment_parses_and_requests_pvh() {
        let opts = parse_config(GUEST_FRAGMENT).unwrap();
        assert_eq!(opts["CONFIG_PVH"], OptionValue::Set("y".into()));
        assert_eq!(opts["CONFIG_MODULES"], OptionValue::Unset);
        assert_eq!(opts["CONFIG_NR_CPUS"], OptionValue::Set("64".into()));
    }

    #[test]
    fn dropped_options_lists_missing_and_wrong_values_only() {
        let fragment = parse_config(
            "CONFIG_A=y\nCONFIG_B=y\nCONFIG_N=64\n# CONFIG_M is not set\nCONFIG_OK=y\n",
        )
        .unwrap();
        let generated = parse_config(
            "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_N=2\nCONFIG_M=y\nCONFIG_OK=y\n",
        )
        .unwrap();
        let dropped = dropped_options(&fragment, &generated);
        let shown: Vec<String> = dropped.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "CONFIG_B (wanted y, got not set)",
                "CONFIG_M (wanted not set, got y)",
                "CONFIG_N (wanted 64, got 2)",
            ]
        );
    }

    #[test]
    fn dropped_options_absent_from_generated_counts_as_unset() {
        let fragment = parse_config("CONFIG_X=y\n# CONFIG_Y is not set\n").unwrap();
        let dropped = dropped_options(&fragment, &BTreeMap::new());
        assert_eq!(dropped.len(), 1);
        assert_eq!(dropped[0].name, "CONFIG_X");
    }
}
