from meltguard.cli import main

raise SystemExit(main())
