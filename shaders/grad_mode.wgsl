// Where the class-index kernels write the gradient (`grad_mode` of their parameters;
// `GradMode` on the host).

const GRAD_NONE: u32 = 0u;
// To the `grad` array.
const GRAD_SEPARATE: u32 = 1u;
// Over the logits.
const GRAD_IN_PLACE: u32 = 2u;
