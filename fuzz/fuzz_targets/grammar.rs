//! Chat grammar: `addressed` then `parse` on arbitrary text must never panic,
//! and `addressed` returns a piece of its input.
#![no_main]

use fleetcmd_core::grammar::{addressed, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let _ = parse(text);
    // Bot names that share bytes with multi-byte characters exercise the
    // case-insensitive prefix strip at char boundaries.
    let bot = match flags % 4 {
        0 => "fleetcmd",
        1 => "",
        2 => "é",
        _ => "FleetCmd-2",
    };
    if let Some(cmd) = addressed(text, bot, flags & 4 != 0) {
        assert!(
            text.contains(cmd),
            "addressed() returned text not in its input"
        );
        let _ = parse(cmd);
    }
});
