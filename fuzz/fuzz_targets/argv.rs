//! Argv building: a fixed policy with every argument kind, fuzzed values.
//! On success the argv has the template's length, literal elements are
//! unchanged and each placeholder element is its value verbatim.
#![no_main]

use std::collections::BTreeMap;
use std::sync::OnceLock;

use fleetcmd_core::argv::{bind_positional, build_argv, validate_arg};
use fleetcmd_core::policy::Policy;
use libfuzzer_sys::fuzz_target;

const POLICY: &str = r#"
version = 1

[commands.echo]
argv = ["/bin/echo", "--", "{text}", "{text}"]
args.text = { kind = "text", max_len = 40 }

[commands.logs]
argv = ["/usr/bin/journalctl", "-u", "{unit}", "-n", "{lines}", "--no-pager"]
args.unit = { kind = "pattern", pattern = "^[a-z0-9@._-]+\\.service$" }
args.lines = { kind = "int", min = 1, max = 500, default = 50 }

[commands.grep]
argv = ["/bin/grep", "{pattern}", "{file}"]
args.pattern = { kind = "text", allow_dash = true }
args.file = { kind = "path", prefixes = ["/var/log", "/srv/app/"] }

[commands.ping]
argv = ["/bin/ping", "-c", "1", "-w", "{wait}", "{host}"]
args.host = { kind = "hostname" }
args.wait = { kind = "duration", default = "5s" }

[commands.restart]
argv = ["/usr/bin/systemctl", "restart", "{unit}"]
args.unit = { kind = "enum", values = ["nginx.service", "app.service"] }
"#;

fn policy() -> &'static Policy {
    static P: OnceLock<Policy> = OnceLock::new();
    P.get_or_init(|| Policy::parse(POLICY).expect("the fuzz policy is valid"))
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let p = policy();
    let names: Vec<&String> = p.commands.keys().collect();
    let def = &p.commands[names[usize::from(pick) % names.len()]];
    // Values are separated by U+001F (unit separator), so any other byte,
    // blanks and quotes included, can be inside a value.
    let values: Vec<String> = text.split('\u{1f}').map(str::to_string).collect();
    let Ok(bound) = bind_positional(def, &values) else {
        return;
    };
    let mut bound: BTreeMap<String, String> = bound;
    if pick & 0x80 != 0 {
        bound.insert("extra".to_string(), String::new());
    }
    if let Ok(argv) = build_argv(def, &bound) {
        assert_eq!(argv.len(), def.argv.len());
        for (elem, got) in def.argv.iter().zip(&argv) {
            let placeholder = elem
                .strip_prefix('{')
                .and_then(|e| e.strip_suffix('}'))
                .filter(|n| def.args.contains_key(*n));
            match placeholder {
                Some(name) => {
                    let want = bound
                        .get(name)
                        .or(def.args[name].default.as_ref())
                        .expect("build_argv succeeded, so a value or default exists");
                    // The value's canonical form (an `int` in plain decimal,
                    // a `duration` trimmed), exactly as validated.
                    let canonical = validate_arg(name, &def.args[name], want)
                        .expect("build_argv succeeded, so the value is valid");
                    assert_eq!(got, &canonical, "placeholder {elem} must be its canonical value");
                    if got.starts_with('-') {
                        assert!(def.args[name].allow_dash, "dash value accepted for {name}");
                    }
                }
                None => assert_eq!(got, elem, "literal element changed"),
            }
        }
    }
});
