// The fused kernel without a metrics binding (pipelines that do not compute metrics, on
// every adapter): the store does nothing and binds nothing.

fn store_row_metrics(row: u32, record: array<vec4<u32>, 2>) {}
