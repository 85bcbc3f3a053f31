//! Label selectors: whatever `parse` accepts prints (`Display`) to a text
//! that parses back to an equal selector, whose printing is stable.
#![no_main]

use std::collections::BTreeMap;

use fleetcmd_core::selector::{Selector, parse_labels};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Ok(sel) = Selector::parse(text) {
        let printed = sel.to_string();
        let again = Selector::parse(&printed).unwrap_or_else(|e| {
            panic!("{text:?} printed as {printed:?}, which fails to parse: {e}")
        });
        assert_eq!(again, sel, "{text:?} printed as {printed:?}");
        assert_eq!(again.to_string(), printed);
        assert!(sel.implies(&sel));
        let labels = BTreeMap::from([
            ("role".to_string(), "web".to_string()),
            ("env".to_string(), "prod".to_string()),
        ]);
        let _ = sel.matches(text, &labels);
        let _ = sel.matches("web-1", &BTreeMap::new());
    }
    if let Ok(labels) = parse_labels(text) {
        let _ = Selector::all().matches("h", &labels);
    }
});
