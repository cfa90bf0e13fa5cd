"""Experiments built on the library: the side-by-side comparison of token-reduction variants
(`compare`), the Fashion-MNIST mini reproduction of the paper (`mini_repro`) and FlexiDiT's
inference tricks (`flexidit`). They sit at the top of the import order: they may use any other
module, and nothing in the core imports them."""
