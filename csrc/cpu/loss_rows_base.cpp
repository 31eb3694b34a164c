// Per-row epilogues compiled for the build's baseline ISA (always safe to run).
#define COPSD_ISA base
#include "loss_rows.h"
