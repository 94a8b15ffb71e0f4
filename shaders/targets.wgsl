// Class-index targets.

// Whether a row with target `t` is left out of the loss: `t` is the ignore index, or no
// class of [0, classes). The host rejects out-of-range targets before dispatch; treating
// them as ignored keeps every index in bounds regardless.
fn ignored_target(t: i32, ignore_index: i32, classes: u32) -> bool {
    return t == ignore_index || t < 0 || u32(t) >= classes;
}
