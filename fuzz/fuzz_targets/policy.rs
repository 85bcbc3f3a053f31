//! Policy parsing and validation on arbitrary UTF-8 must never panic; an
//! accepted policy's commands build their argv from defaults without panicking.
#![no_main]

use std::collections::BTreeMap;

use fleetcmd_core::argv::build_argv;
use fleetcmd_core::policy::Policy;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    match Policy::parse(text) {
        Ok(policy) => {
            for def in policy.commands.values() {
                let _ = def.positional();
                if let Ok(argv) = build_argv(def, &BTreeMap::new()) {
                    assert_eq!(argv.len(), def.argv.len());
                }
            }
        }
        Err(errors) => {
            assert!(!errors.0.is_empty(), "an error list must not be empty");
            let _ = errors.to_string();
        }
    }
});
