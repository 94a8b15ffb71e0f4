// Where the fused kernel writes each row's metrics (row_metrics.wgsl): two vec4 per row
// at binding 9, on adapters with a ninth storage buffer per stage.

@group(0) @binding(9) var<storage, read_write> row_metrics: array<vec4<u32>>;

fn store_row_metrics(row: u32, record: array<vec4<u32>, 2>) {
    row_metrics[2u * row] = record[0];
    row_metrics[2u * row + 1u] = record[1];
}
