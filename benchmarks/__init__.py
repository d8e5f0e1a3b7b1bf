"""Dev harnesses run by make targets (admission, stores, engine, soak). They import meltguard;
meltguard never imports them."""
