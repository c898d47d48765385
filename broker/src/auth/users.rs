//! `[[users]]` in the config file: the raw entries ([`UserEntry`]) as TOML gives
//! them, and their checked, compiled form ([`User`]). A partial or malformed entry
//! refuses to start, naming the entry.
//!
//! ```toml
//! [[users]]
//! name = "orders-service"
//! password_hash = "$argon2id$v=19$m=19456,t=2,p=1$..."   # or: token = "...", or certificate = true
//! publish = { allow = ["orders.>"], deny = ["orders.internal.>"] }
//! subscribe = { allow = ["payments.*.settled"] }
//! queues = [{ pattern = "orders.*", allow = ["consume", "manage"] }]
//! ```

use std::collections::HashSet;

use serde::Deserialize;
use tidings_protocol::{Pattern, Topic};

use super::permissions::{Permissions, QueueRight, QueueRule, TopicRules};
use super::secret::{PasswordHashString, SecretDigest};

/// Allow and deny patterns as written in the file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicRulesEntry {
    /// Patterns that allow.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Patterns that deny (they win).
    #[serde(default)]
    pub deny: Vec<String>,
}

/// Queue rights by queue-name pattern, as written in the file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueRuleEntry {
    /// Queue names (a pattern: `jobs.*`, `>`).
    pub pattern: String,
    /// Rights granted: `consume`, `manage`, `dead_letters`.
    #[serde(default)]
    pub allow: Vec<QueueRight>,
    /// Rights refused (over any grant).
    #[serde(default)]
    pub deny: Vec<QueueRight>,
}

/// One `[[users]]` entry as written in the file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserEntry {
    /// The user name clients send in HELLO: one topic token (no dots, spaces or
    /// wildcards), since it also names the user's inbox `_INBOX.<name>.>`.
    #[serde(default)]
    pub name: String,
    /// An argon2id PHC string from `tidings-broker hash-password`.
    #[serde(default)]
    pub password_hash: Option<String>,
    /// A token (at least 16 characters) instead of a password.
    #[serde(default)]
    pub token: Option<String>,
    /// The user may log in with a client certificate (mutual TLS) whose subject
    /// common name or a subject alternative name is the user's name.
    #[serde(default)]
    pub certificate: bool,
    /// What the user may publish.
    #[serde(default)]
    pub publish: TopicRulesEntry,
    /// What the user may subscribe to (its own inbox is always allowed).
    #[serde(default)]
    pub subscribe: TopicRulesEntry,
    /// What the user may do with queues.
    #[serde(default)]
    pub queues: Vec<QueueRuleEntry>,
}

/// Shortest token accepted in a `[[users]]` entry: short tokens are guessable.
pub const MIN_TOKEN_LEN: usize = 16;

/// How a user proves who it is.
#[derive(Debug, Clone)]
pub enum Credential {
    /// An argon2id hash of its password.
    Password(PasswordHashString),
    /// The digest of its token.
    Token(SecretDigest),
    /// Only a client certificate.
    CertificateOnly,
}

/// A checked user.
#[derive(Debug, Clone)]
pub struct User {
    /// Its name.
    pub name: String,
    /// Its password or token.
    pub credential: Credential,
    /// May log in with a client certificate naming it.
    pub certificate: bool,
    /// What it may do.
    pub permissions: Permissions,
}

/// A `[[users]]` entry that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("users[{index}]{}: {message}", name_part(.name))]
pub struct UserEntryError {
    /// Position in the file, from 0.
    pub index: usize,
    /// The entry's name, if it has one.
    pub name: String,
    /// What is wrong.
    pub message: String,
}

fn name_part(name: &str) -> String {
    if name.is_empty() {
        String::new()
    } else {
        format!(" (`{name}`)")
    }
}

/// Checks every entry (fail closed) and compiles them.
pub fn compile(entries: &[UserEntry]) -> Result<Vec<User>, UserEntryError> {
    let mut seen = HashSet::new();
    let mut tokens = HashSet::new();
    let mut users = Vec::with_capacity(entries.len());
    for (index, entry) in entries.iter().enumerate() {
        let fail = |message: String| UserEntryError {
            index,
            name: entry.name.clone(),
            message,
        };
        let user = compile_one(entry).map_err(fail)?;
        if !seen.insert(entry.name.clone()) {
            return Err(fail("a user of this name is defined twice".into()));
        }
        if let Some(token) = &entry.token
            && !tokens.insert(token.clone())
        {
            return Err(fail(
                "another user has the same token; tokens must be unique".into(),
            ));
        }
        users.push(user);
    }
    Ok(users)
}

fn compile_one(entry: &UserEntry) -> Result<User, String> {
    if entry.name.is_empty() {
        return Err("`name` is missing or empty".into());
    }
    if entry.name.contains('.') || Topic::validate(&entry.name).is_err() {
        return Err(format!(
            "name `{}` must be one token: no dots, whitespace, `*` or `>`",
            entry.name
        ));
    }
    let credential = match (&entry.password_hash, &entry.token) {
        (Some(_), Some(_)) => {
            return Err("set `password_hash` or `token`, not both".into());
        }
        (Some(phc), None) => Credential::Password(
            PasswordHashString::parse(phc).map_err(|e| format!("`password_hash`: {e}"))?,
        ),
        (None, Some(token)) => {
            if token.chars().count() < MIN_TOKEN_LEN {
                return Err(format!(
                    "`token` must be at least {MIN_TOKEN_LEN} characters"
                ));
            }
            Credential::Token(SecretDigest::of(token.as_bytes()))
        }
        (None, None) if entry.certificate => Credential::CertificateOnly,
        (None, None) => {
            return Err(
                "no credential: set `password_hash`, `token` or `certificate = true`".into(),
            );
        }
    };
    let publish = topic_rules("publish", &entry.publish)?;
    let subscribe = topic_rules("subscribe", &entry.subscribe)?;
    let mut queues = Vec::with_capacity(entry.queues.len());
    for (i, rule) in entry.queues.iter().enumerate() {
        let pattern = Pattern::new(rule.pattern.as_str())
            .map_err(|e| format!("queues[{i}].pattern `{}`: {e}", rule.pattern))?;
        if rule.allow.is_empty() && rule.deny.is_empty() {
            return Err(format!(
                "queues[{i}] (`{}`) grants and refuses nothing; give `allow` or `deny`",
                rule.pattern
            ));
        }
        queues.push(QueueRule {
            pattern,
            allow: rule.allow.clone(),
            deny: rule.deny.clone(),
        });
    }
    Ok(User {
        permissions: Permissions::new(&entry.name, publish, subscribe, queues),
        name: entry.name.clone(),
        credential,
        certificate: entry.certificate,
    })
}

fn topic_rules(what: &str, entry: &TopicRulesEntry) -> Result<TopicRules, String> {
    let parse = |list: &[String], kind: &str| -> Result<Vec<Pattern>, String> {
        list.iter()
            .map(|s| {
                Pattern::new(s.as_str()).map_err(|e| format!("{what}.{kind} pattern `{s}`: {e}"))
            })
            .collect()
    };
    Ok(TopicRules {
        allow: parse(&entry.allow, "allow")?,
        deny: parse(&entry.deny, "deny")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token_user(name: &str) -> UserEntry {
        UserEntry {
            name: name.into(),
            token: Some("0123456789abcdef".into()),
            ..UserEntry::default()
        }
    }

    #[test]
    fn partial_entries_fail_closed_naming_the_entry() {
        let no_cred = UserEntry {
            name: "bob".into(),
            ..UserEntry::default()
        };
        let err = compile(&[token_user("a"), no_cred]).unwrap_err();
        assert_eq!(err.index, 1);
        assert!(err.to_string().contains("users[1] (`bob`)"), "{err}");
        assert!(err.message.contains("no credential"));

        let err = compile(&[UserEntry::default()]).unwrap_err();
        assert!(err.to_string().starts_with("users[0]: `name`"), "{err}");

        let mut bad_pattern = token_user("c");
        bad_pattern.subscribe.deny.push("a.>.b".into());
        let err = compile(&[bad_pattern]).unwrap_err();
        assert!(
            err.message.contains("subscribe.deny pattern `a.>.b`"),
            "{err}"
        );

        let mut both = token_user("d");
        both.password_hash = Some("x".into());
        assert!(compile(&[both]).unwrap_err().message.contains("not both"));

        let mut short = token_user("e");
        short.token = Some("short".into());
        assert!(compile(&[short]).unwrap_err().message.contains("16"));

        let mut bad_hash = token_user("f");
        bad_hash.token = None;
        bad_hash.password_hash = Some("$argon2id$garbage".into());
        assert!(
            compile(&[bad_hash])
                .unwrap_err()
                .message
                .contains("password_hash")
        );

        assert!(compile(&[token_user("g"), token_user("g")]).is_err());
        assert!(compile(&[token_user("dotted.name")]).is_err());
    }

    #[test]
    fn parses_from_toml() {
        let text = r#"
            [[users]]
            name = "w"
            token = "0123456789abcdef"
            publish = { allow = ["a.>"], deny = ["a.b"] }
            queues = [{ pattern = "jobs.*", allow = ["consume", "dead_letters"] }]
        "#;
        #[derive(Deserialize)]
        struct File {
            users: Vec<UserEntry>,
        }
        let file: File = toml::from_str(text).unwrap();
        let users = compile(&file.users).unwrap();
        assert_eq!(users[0].name, "w");
        assert!(users[0].permissions.check_publish("a.c").is_ok());
        assert!(users[0].permissions.check_publish("a.b").is_err());
        let unknown = "[[users]]\nname = \"x\"\ntokn = \"0123456789abcdef\"\n";
        assert!(toml::from_str::<File>(unknown).is_err());
    }
}
