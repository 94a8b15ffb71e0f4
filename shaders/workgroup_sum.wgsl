// The sum of one f32 per invocation over the workgroup, as a pairwise tree in workgroup
// memory (log2(WG) barriers). Its shape depends on WG alone, so the total is
// bit-identical run to run. Call it from uniform control flow.

#import workgroup

var<workgroup> wg_terms: array<f32, WG>;

// The workgroup's total of `v`, in every invocation.
fn workgroup_sum(lid: u32, v: f32) -> f32 {
    wg_terms[lid] = v;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if (lid < stride) {
            wg_terms[lid] = wg_terms[lid] + wg_terms[lid + stride];
        }
        workgroupBarrier();
    }
    return wg_terms[0];
}
