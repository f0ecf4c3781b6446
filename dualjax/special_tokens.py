"""Special token ids (DESIGN.md §6): <unk>=0, <s>=1, </s>=2, <pad>=3, <mask>=4, <special_0..10>=5..15."""

UNK = 0
BOS = 1
EOS = 2
PAD = 3
MASK = 4
NUM_SPECIAL = 16  # ids below this are never masked by the MDM objective
