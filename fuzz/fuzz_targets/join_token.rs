//! Join tokens: `parse` never panics, and an accepted token encodes back to
//! exactly the input (no second spelling of the same token).
#![no_main]

use fleetcmd_core::join_token::{JoinToken, TOKEN_LEN};
use libfuzzer_sys::fuzz_target;

fn check(s: &str) {
    if let Ok(token) = JoinToken::parse(s) {
        assert_eq!(
            token.encode().expose(),
            s,
            "token does not re-encode to its input"
        );
        assert_eq!(token.id_hex().len(), 16);
    }
}

fuzz_target!(|text: &str| {
    check(text);
    // Random text rarely has the exact length and prefix; also try the input
    // as the body of a token, padded or cut to the right length.
    let mut body: String = text.chars().filter(|c| c.is_ascii()).collect();
    let want = TOKEN_LEN - "fct1_".len();
    while body.len() < want {
        body.push('A');
    }
    body.truncate(want);
    check(&format!("fct1_{body}"));
});
