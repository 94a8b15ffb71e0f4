//! Any command line given to `xent`'s option parser and `eval`'s option checks: a usage
//! error or a typed error, never a panic.
#![no_main]

use clap::Parser;
use libfuzzer_sys::fuzz_target;

#[path = "../../src/cli/args.rs"]
#[allow(dead_code)]
mod args;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let tokens = std::iter::once("xent").chain(text.split(['\0', ' ', '\n']).filter(|t| !t.is_empty()));
    if let Ok(cli) = args::Cli::try_parse_from(tokens) {
        if let args::Command::Eval(eval) = cli.command {
            let _ = args::eval_options(&eval);
        }
    }
});
