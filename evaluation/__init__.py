"""The judges and the evaluation suite: the Fashion-MNIST classifier, the shapes-world detector, metrics (FD), the
evaluation suite and its reports. The lab, apart from the training library: nothing in training/ imports it."""
