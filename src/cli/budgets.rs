//! The `budgets` subcommand: the operator's view of one day's spend, read from the Redis
//! that the instances share, with each scope's budget and what is left of it.
//!
//! It reads the settings from the environment like the server (the same variables give
//! the same Redis, prefix, day zone and budgets), and only reads Redis ([`scan`]). Its
//! errors are one line on stderr: 2 for settings and arguments, 1 when Redis cannot be
//! read; they show the Redis URL only without its user info. Ids come from clients, so
//! the table escapes control characters (a user id must not drive the terminal).

mod scan;

use std::cmp::Reverse;
use std::fmt::Write as _;
use std::process::ExitCode;

use serde::Serialize;

use self::scan::{DayRead, Entry};
use super::{fail, output};
use crate::budget::Nanos;
use crate::settings::{PREFIX, Settings};
use crate::store::{id_from_part, id_part};

const COMMAND: &str = "budgets";

/// Arguments of `budgets`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print a JSON array of objects (amounts as decimal strings) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// The day to show, in `DAY_TIMEZONE` (default: today there).
    #[arg(long, value_name = "YYYY-MM-DD")]
    pub date: Option<String>,
    /// Stop after this many budget keys (each costs memory here); the output says so.
    #[arg(long, value_name = "N", default_value_t = 1_000_000)]
    pub max_keys: usize,
}

/// One scope's line: the JSON object, with stable field names (a field that does not
/// apply is `null`). Ids longer than 64 bytes are kept in Redis as their SHA-256 only;
/// one the settings do not name shows as `sha256:<hex>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
struct Row {
    /// `user`, `product` or `client`.
    kind: &'static str,
    product: Option<String>,
    user: Option<String>,
    client: Option<String>,
    /// Settled costs and reservations charged on expiry, USD.
    spent_usd: String,
    /// Reservations of requests still in flight (or not yet charged on expiry), USD.
    open_usd: String,
    /// The scope's budget in the settings; `null` when it has none.
    budget_usd: Option<String>,
    /// Budget - spent - open, never below 0; `null` without a budget.
    left_usd: Option<String>,
    #[serde(skip)]
    spent: Nanos,
    #[serde(skip)]
    open: Nanos,
}

/// Runs the subcommand; returns the process exit code.
pub fn run(args: &Args) -> ExitCode {
    let settings = match Settings::from_env() {
        Ok((settings, _)) => settings,
        Err(error) => return fail(COMMAND, &format!("configuration error: {error}")),
    };
    let Some(redis) = &settings.redis else {
        return fail(
            COMMAND,
            &format!(
                "{PREFIX}REDIS_URL is not set: without Redis each instance keeps its budgets in its own memory, and there is nothing to read"
            ),
        );
    };
    if args.max_keys == 0 {
        return fail(COMMAND, "--max-keys must be at least 1");
    }
    let day = if let Some(text) = &args.date {
        let Some(day) = parse_date(text) else {
            return fail(COMMAND, "--date: expected a day as YYYY-MM-DD");
        };
        day
    } else {
        let now = i64::try_from(settings.clock.wall().as_secs()).unwrap_or(i64::MAX);
        settings.day_zone.day_at(now).key()
    };
    crate::server::install_crypto_provider();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("api-key-server {COMMAND}: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let read = match runtime.block_on(scan::read_day(redis, &day, args.max_keys)) {
        Ok(read) => read,
        Err(error) => {
            // redis-rs errors name the kind and the server's answer, never the URL; some
            // span lines (a parse error lists what it met), and this is one line.
            let error = error.to_string();
            let error: Vec<&str> = error.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
            eprintln!(
                "api-key-server {COMMAND}: cannot read Redis at {}: {}",
                redis.redacted_url(),
                error.join("; ")
            );
            return ExitCode::FAILURE;
        }
    };
    let (rows, unnamed) = rows(&settings, &read);
    if args.json {
        match serde_json::to_string_pretty(&rows) {
            Ok(json) => output::line(&json),
            Err(error) => {
                eprintln!("api-key-server {COMMAND}: {error}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        output::line(&format!(
            "Spend on {day} (DAY_TIMEZONE {}), REDIS_PREFIX {}:",
            settings.day_zone.name(),
            redis.prefix
        ));
        output::line(&table(&rows));
    }
    let skipped = read.skipped + unnamed;
    if skipped > 0 {
        eprintln!(
            "api-key-server {COMMAND}: {skipped} key(s) matched but are not budget hashes of this version; skipped"
        );
    }
    if read.truncated {
        eprintln!(
            "api-key-server {COMMAND}: stopped after {} budget keys (--max-keys): the list is incomplete",
            args.max_keys
        );
    }
    ExitCode::SUCCESS
}

/// `YYYY-MM-DD` and nothing else (jiff also reads other ISO 8601 forms).
fn parse_date(text: &str) -> Option<String> {
    let date: jiff::civil::Date = text.parse().ok()?;
    let key = date.to_string();
    (key == text).then_some(key)
}

/// The scopes, each with its budget from the settings, top spenders first; and how many
/// entries had a tag that is not a scope's.
fn rows(settings: &Settings, read: &DayRead) -> (Vec<Row>, usize) {
    let products: Vec<&str> = settings.products.iter().map(AsRef::as_ref).collect();
    let clients: Vec<&str> = settings
        .hmac
        .secrets
        .keys()
        .chain(settings.budgets.clients.keys())
        .map(String::as_str)
        .collect();
    let budgets = &settings.budgets;
    let mut rows: Vec<Row> = read
        .entries
        .iter()
        .filter_map(|entry| {
            let (kind, product, user, client) = match decode_tag(&entry.tag)? {
                Tag::User { product, user } => {
                    let product = name(product, &products)?;
                    ("user", Some(product), Some(name(user, &[])?), None)
                }
                Tag::Product(product) => ("product", Some(name(product, &products)?), None, None),
                Tag::Client(client) => ("client", None, None, Some(name(client, &clients)?)),
            };
            let budget = match kind {
                "user" => budgets.user_budget(product.as_deref().unwrap_or_default()),
                "product" => budgets.product_budget(product.as_deref().unwrap_or_default()),
                _ => budgets.client_budget(client.as_deref().unwrap_or_default()),
            };
            Some(row(kind, product, user, client, entry, budget))
        })
        .collect();
    let unnamed = read.entries.len() - rows.len();
    rows.sort_by(|a, b| {
        (
            Reverse(a.spent),
            Reverse(a.open),
            a.kind,
            &a.product,
            &a.user,
            &a.client,
        )
            .cmp(&(
                Reverse(b.spent),
                Reverse(b.open),
                b.kind,
                &b.product,
                &b.user,
                &b.client,
            ))
    });
    (rows, unnamed)
}

fn row(
    kind: &'static str,
    product: Option<String>,
    user: Option<String>,
    client: Option<String>,
    entry: &Entry,
    budget: Option<Nanos>,
) -> Row {
    Row {
        kind,
        product,
        user,
        client,
        spent_usd: entry.spent.to_string(),
        open_usd: entry.open.to_string(),
        budget_usd: budget.map(|b| b.to_string()),
        left_usd: budget.map(|b| b.saturating_sub(entry.spent).saturating_sub(entry.open).to_string()),
        spent: entry.spent,
        open: entry.open,
    }
}

/// A scope's hash tag taken apart: the inverse of `Scope::tag`, ids still escaped.
#[derive(Debug, PartialEq, Eq)]
enum Tag<'t> {
    User { product: &'t str, user: &'t str },
    Product(&'t str),
    Client(&'t str),
}

fn decode_tag(tag: &str) -> Option<Tag<'_>> {
    // Escaped ids are `x`/`h` and hex: never a `:`.
    let parts: Vec<&str> = tag.split(':').collect();
    match parts.as_slice() {
        ["p", product, "u", user] => Some(Tag::User { product, user }),
        ["p", product] => Some(Tag::Product(product)),
        ["c", client] => Some(Tag::Client(client)),
        _ => None,
    }
}

/// The id of an escaped part: decoded, or for a long id's hash the candidate that has
/// it, else `sha256:<hex>`. `None` for a part `id_part` never writes.
fn name(part: &str, candidates: &[&str]) -> Option<String> {
    if let Some(id) = id_from_part(part) {
        return Some(id);
    }
    let hash = part.strip_prefix('h')?;
    if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some(
        candidates
            .iter()
            .find(|c| id_part(c) == part)
            .map_or_else(|| format!("sha256:{hash}"), |c| (*c).to_owned()),
    )
}

/// The rows as an aligned table (amounts right-aligned), or a line saying there is none.
fn table(rows: &[Row]) -> String {
    if rows.is_empty() {
        return "No budget spend recorded on that day.".to_owned();
    }
    let header = [
        "KIND",
        "PRODUCT",
        "USER/CLIENT",
        "SPENT_USD",
        "OPEN_USD",
        "BUDGET_USD",
        "LEFT_USD",
    ];
    let dash = || "-".to_owned();
    let cells: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            [
                r.kind.to_owned(),
                r.product.as_deref().map_or_else(dash, printable),
                r.user.as_deref().or(r.client.as_deref()).map_or_else(dash, printable),
                r.spent_usd.clone(),
                r.open_usd.clone(),
                r.budget_usd.clone().unwrap_or_else(dash),
                r.left_usd.clone().unwrap_or_else(dash),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for line in &cells {
        for (width, cell) in widths.iter_mut().zip(line) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    let mut push = |line: [&str; 7]| {
        let mut out = String::new();
        for (column, (cell, width)) in line.iter().zip(widths).enumerate() {
            let sep = if column == 0 { "" } else { "  " };
            // Ids to the left, amounts to the right.
            let _ = if column < 3 {
                write!(out, "{sep}{cell:<width$}")
            } else {
                write!(out, "{sep}{cell:>width$}")
            };
        }
        text.push_str(out.trim_end());
        text.push('\n');
    };
    push(header);
    for line in &cells {
        push(line.each_ref().map(String::as_str));
    }
    text.pop();
    text
}

/// `id` with control characters escaped (`\n`, `\u{1b}`), so it stays on its line.
fn printable(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::Scope;

    #[test]
    fn tags_come_apart_into_the_scope_they_were_made_from() {
        let cases = [
            (
                Scope::User {
                    product: "demo".into(),
                    user: "a:l}i{ce".into(),
                },
                ("user", "demo", "a:l}i{ce"),
            ),
            (Scope::Product("demo".into()), ("product", "demo", "")),
            (Scope::Client("desk".into()), ("client", "", "desk")),
        ];
        for (scope, (kind, product, other)) in cases {
            let tag = scope.tag();
            let decoded = match decode_tag(&tag).unwrap() {
                Tag::User { product, user } => ("user", name(product, &[]).unwrap(), name(user, &[]).unwrap()),
                Tag::Product(product) => ("product", name(product, &[]).unwrap(), String::new()),
                Tag::Client(client) => ("client", String::new(), name(client, &[]).unwrap()),
            };
            assert_eq!(decoded, (kind, product.to_owned(), other.to_owned()), "{tag}");
        }
        assert_eq!(decode_tag("p:x61:u"), None);
        assert_eq!(decode_tag("q:x61"), None);
    }

    #[test]
    fn long_ids_are_named_when_the_settings_know_them() {
        let long = "p".repeat(80);
        let part = id_part(&long);
        assert_eq!(name(&part, &["demo", &long]).as_deref(), Some(long.as_str()));
        let unknown = name(&part, &["demo"]).unwrap();
        assert_eq!(unknown, format!("sha256:{}", &part[1..]));
        assert_eq!(name("hxyz", &[]), None);
        assert_eq!(name("zzz", &[]), None);
    }

    #[test]
    fn dates_are_read_only_as_yyyy_mm_dd() {
        assert_eq!(parse_date("2026-12-07").as_deref(), Some("2026-12-07"));
        for bad in [
            "20261207",
            "2026-12-7",
            "2026-13-01",
            "yesterday",
            "",
            "2026-12-07T00:00",
        ] {
            assert_eq!(parse_date(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_table_aligns_columns_and_keeps_ids_on_their_line() {
        let entry = |spent, open| Entry {
            tag: String::new(),
            spent: Nanos(spent),
            open: Nanos(open),
        };
        let rows = [
            row(
                "user",
                Some("demo".to_owned()),
                Some("evil\n\u{1b}[31m".to_owned()),
                None,
                &entry(1_500_000_000, 20_000_000),
                Some(Nanos(2_000_000_000)),
            ),
            row("client", None, None, Some("desk".to_owned()), &entry(1, 0), None),
        ];
        let text = table(&rows);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].starts_with("KIND    PRODUCT  USER/CLIENT"), "{text}");
        assert!(lines[1].contains("evil\\n\\u{1b}[31m"), "{text}");
        assert!(lines[1].ends_with("1.5      0.02           2      0.48"), "{text}");
        assert!(
            lines[2].ends_with("0.000000001         0           -         -"),
            "{text}"
        );
        assert_eq!(table(&[]), "No budget spend recorded on that day.");
    }
}
