"""Sample-quality evaluation: ADM-compatible FID / sFID / IS / precision-recall (`metrics`), the
FID Inception network (`inception`), the Fashion-MNIST feature network (`fmnist_features`) and the
command-line evaluator (`evaluate`)."""
