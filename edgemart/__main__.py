from edgemart.cli import main

raise SystemExit(main())
